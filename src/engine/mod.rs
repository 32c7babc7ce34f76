//! Where and how a run computes (`Placement`: device, compute dtype, engine, processes), chosen
//! once per run and named where the user sees it (`train_begin`, the headless start line, the
//! dashboard header), and the CPU kernels.

pub mod cpu;

use std::fmt;

pub use cpu::kernels::Matmuls;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// How the forward and backward of a micro-batch are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// f32 on the CPU without dropout: the step written out llm.c-style over `cpu` kernels
    /// (`model::cpu_step`), no autograd. Gradient checkpointing recomputes each block.
    CpuStep,
    /// f32 on the CPU with dropout: candle's autograd over the fused CPU ops (linear,
    /// LayerNorm, GELU, head + cross-entropy); attention is composed while dropout is on,
    /// because dropout on the attention probabilities has no fused kernel.
    CpuAutograd,
    /// candle's autograd over composed ops, every one with a backward: CUDA (f32, or bf16
    /// compute over f32 master weights), and f64 on the CPU for gradient checks.
    Autograd,
}

impl Engine {
    /// The engine for a run on `device` computing in `dtype` with `dropout`. Every combination
    /// maps to exactly one engine; `train::placement` refuses the ones it does not train (bf16
    /// on the CPU).
    fn choose(device: &Device, dtype: DType, dropout: f64) -> Engine {
        match (device.is_cpu(), dtype, dropout > 0.0) {
            (true, DType::F32, false) => Engine::CpuStep,
            (true, DType::F32, true) => Engine::CpuAutograd,
            _ => Engine::Autograd,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::CpuStep => "cpu-step",
            Engine::CpuAutograd => "cpu-autograd",
            Engine::Autograd => "autograd",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kernels behind the model's ops (`model::ops`): chosen with the engine, never by looking
/// at a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// `cpu::ops`: contiguous f32 on the CPU, one kernel forward and one backward per op, the
    /// matmuls in the given arithmetic.
    FusedCpu(Matmuls),
    /// Chains of candle ops that every device and dtype has.
    Composed,
}

/// Where and how a run computes, decided once (`train::placement` for a run, `of` for a model
/// used where its weights are) and passed to everything that builds or steps a model.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    /// The activations' dtype; parameters and optimizer state stay f32.
    pub dtype: DType,
    pub engine: Engine,
    /// The CPU engines' matmul arithmetic: bf16 products (autocast) over f32 activations, or f32.
    pub matmuls: Matmuls,
    /// Processes training together (1 unless launched by mpirun).
    pub world_size: usize,
}

impl Placement {
    /// The engine for computing in `dtype` on `device` with `dropout`, in a world of `world_size`.
    pub fn new(device: Device, dtype: DType, dropout: f64, world_size: usize) -> Placement {
        let engine = Engine::choose(&device, dtype, dropout);
        Placement { device, dtype, engine, matmuls: Matmuls::F32, world_size }
    }

    /// The written-out CPU step with bf16 matmuls (PyTorch autocast's arithmetic: operands in
    /// bf16, sums and everything else in f32), activations f32. The caller has checked that the
    /// CPU has AVX512-BF16 (`cpu::bf16::available`) and that dropout is off.
    pub fn cpu_bf16_matmuls(world_size: usize) -> Placement {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
            engine: Engine::CpuStep,
            matmuls: Matmuls::Bf16,
            world_size,
        }
    }

    /// One process computing in the weights' own dtype on their device, without dropout: for
    /// inference and for gradient checks in f64.
    pub fn of(device: &Device, dtype: DType) -> Placement {
        Placement::new(device.clone(), dtype, 0.0, 1)
    }

    /// The kernels the model's ops use.
    pub fn kernels(&self) -> Kernels {
        match self.engine {
            Engine::CpuStep | Engine::CpuAutograd => Kernels::FusedCpu(self.matmuls),
            Engine::Autograd => Kernels::Composed,
        }
    }

    /// The compute dtype a user asked for: bf16 where the matmuls or activations are bf16.
    pub fn compute_dtype(&self) -> &'static str {
        match (self.matmuls, self.dtype) {
            (Matmuls::Bf16, _) | (_, DType::BF16) => "bf16",
            (_, DType::F64) => "f64",
            _ => "f32",
        }
    }

    /// The path a run takes, as the start line, `train_begin` and the dashboard name it: the
    /// engine, and with bf16 on the CPU the instruction set that computes it.
    pub fn path(&self) -> String {
        match self.matmuls {
            Matmuls::F32 => self.engine.as_str().to_string(),
            Matmuls::Bf16 => format!("{}, bf16 matmuls (AVX512-BF16)", self.engine.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_has_one_engine() {
        let cpu = Device::Cpu;
        assert_eq!(Engine::choose(&cpu, DType::F32, 0.0), Engine::CpuStep);
        assert_eq!(Engine::choose(&cpu, DType::F32, 0.1), Engine::CpuAutograd);
        assert_eq!(Engine::choose(&cpu, DType::F64, 0.0), Engine::Autograd);
        assert_eq!(Engine::choose(&cpu, DType::BF16, 0.1), Engine::Autograd);
        assert_eq!(Placement::new(cpu.clone(), DType::F32, 0.1, 1).kernels(), Kernels::FusedCpu(Matmuls::F32));
        assert_eq!(Placement::of(&cpu, DType::F64).kernels(), Kernels::Composed);
        let bf16 = Placement::cpu_bf16_matmuls(1);
        assert_eq!(
            (bf16.engine, bf16.kernels(), bf16.compute_dtype()),
            (Engine::CpuStep, Kernels::FusedCpu(Matmuls::Bf16), "bf16")
        );
        assert_eq!(bf16.path(), "cpu-step, bf16 matmuls (AVX512-BF16)");
        assert_eq!(serde_json::to_string(&Engine::CpuStep).unwrap(), "\"cpu-step\"");
    }
}
