//! Where a run computes: device selection (`auto | cpu | cuda | cuda:N`) and the run's
//! `Placement`, decided here once.

use candle_core::{DType, Device};

use crate::config::{DeviceSpec, Precision, RunConfig};
use crate::engine::Placement;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?}: this difflab was built without CUDA; rebuild with `cargo build --release --features cuda` (README: CUDA), or use --device cpu")]
    NoCudaBuild(String),
    #[error("device {spec:?}: {reason}")]
    Unavailable { spec: String, reason: String },
    #[error("dtype bf16 on the CPU needs the AVX512-BF16 instructions (`avx512_bf16` in /proc/cpuinfo: AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later), which this CPU lacks; set --dtype f32 (or use a CUDA device)")]
    NoAvx512Bf16,
    #[error("dtype bf16 on the CPU runs the written-out step, which has no dropout (dropout {0}); set --dropout 0.0 or --dtype f32")]
    Bf16CpuDropout(f64),
    #[error("grad_reduce_dtype bf16 is for CPU processes over MPI; NCCL sums the gradients in f32 on the GPUs (set --grad_reduce_dtype f32)")]
    Bf16ReduceOnGpu,
}

/// The run's placement: the device its `device` setting names, its dtype, the engine for those
/// and its dropout, and the processes it is one of. bf16 on the CPU is autocast's arithmetic on
/// AVX512-BF16 (`cpu_bf16`).
pub fn placement(cfg: &RunConfig, world_size: usize) -> Result<Placement, DeviceError> {
    let device = select(cfg.device)?;
    if cfg.grad_reduce_dtype == Precision::Bf16 && !device.is_cpu() {
        return Err(DeviceError::Bf16ReduceOnGpu);
    }
    let dtype = match cfg.dtype {
        Precision::Bf16 if device.is_cpu() => return cpu_bf16(cfg.dropout, world_size),
        Precision::Bf16 => DType::BF16,
        Precision::F32 => DType::F32,
    };
    Ok(Placement::new(device, dtype, cfg.dropout, world_size))
}

/// bf16 on the CPU: the written-out step with bf16 matmuls, where the CPU has the instructions
/// and dropout is off; refused otherwise (there is no slower bf16 path to fall back on).
pub fn cpu_bf16(dropout: f64, world_size: usize) -> Result<Placement, DeviceError> {
    if !crate::engine::cpu::bf16::available() {
        return Err(DeviceError::NoAvx512Bf16);
    }
    if dropout > 0.0 {
        return Err(DeviceError::Bf16CpuDropout(dropout));
    }
    Ok(Placement::cpu_bf16_matmuls(world_size))
}

/// Resolves a device setting. `auto` is CUDA 0 when this build has CUDA and a GPU answers,
/// else the CPU.
pub fn select(spec: DeviceSpec) -> Result<Device, DeviceError> {
    let ordinal = match spec {
        DeviceSpec::Cpu => return Ok(Device::Cpu),
        DeviceSpec::Auto => {
            return Ok(if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            })
        }
        DeviceSpec::Cuda(n) => n.unwrap_or(0),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NoCudaBuild(spec.to_string()));
    }
    Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable { spec: spec.to_string(), reason: e.to_string() })
}

pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => format!("{:?}", device.location()),
        Device::Metal(_) => "metal".into(),
    }
}

/// Memory the kernel says can be had without swapping (`MemAvailable`), in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Current and peak resident memory of this process, MiB (`VmRSS`, `VmHWM`).
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Memory in use on a CUDA device, MiB: total minus free, so every process's share and the
/// CUDA context count (as `nvidia-smi` shows it). `None` on the CPU or when the query fails.
pub fn gpu_used_mib(device: &Device) -> Option<f64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as f64 / (1024.0 * 1024.0))
        }
        _ => None,
    }
}
