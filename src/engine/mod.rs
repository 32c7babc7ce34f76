//! Where and how a run computes (`Placement`: device, compute dtype, engine, processes), chosen
//! once per run and named where the user sees it (`train_begin`, the headless start line, the
//! dashboard header), and the CPU kernels.

pub mod cpu;

use std::fmt;

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

    /// The kernels the model's ops use under this engine.
    pub fn kernels(self) -> Kernels {
        match self {
            Engine::CpuStep | Engine::CpuAutograd => Kernels::FusedCpu,
            Engine::Autograd => Kernels::Composed,
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
    /// `cpu::ops`: contiguous f32 on the CPU, one kernel forward and one backward per op.
    FusedCpu,
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
    /// Processes training together (1 unless launched by mpirun).
    pub world_size: usize,
}

impl Placement {
    /// The engine for computing in `dtype` on `device` with `dropout`, in a world of `world_size`.
    pub fn new(device: Device, dtype: DType, dropout: f64, world_size: usize) -> Placement {
        let engine = Engine::choose(&device, dtype, dropout);
        Placement { device, dtype, engine, world_size }
    }

    /// One process computing in the weights' own dtype on their device, without dropout: for
    /// inference and for gradient checks in f64.
    pub fn of(device: &Device, dtype: DType) -> Placement {
        Placement::new(device.clone(), dtype, 0.0, 1)
    }

    /// The kernels the model's ops use.
    pub fn kernels(&self) -> Kernels {
        self.engine.kernels()
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
        assert_eq!(Engine::CpuAutograd.kernels(), Kernels::FusedCpu);
        assert_eq!(Placement::of(&cpu, DType::F64).kernels(), Kernels::Composed);
        assert_eq!(serde_json::to_string(&Engine::CpuStep).unwrap(), "\"cpu-step\"");
    }
}
