//! Device selection: `auto | cpu | cuda | cuda:N`.

use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?}: this difflab was built without CUDA; rebuild with `cargo build --release --features cuda` (README: CUDA), or use --device cpu")]
    NoCudaBuild(String),
    #[error("device {spec:?}: {reason}")]
    Unavailable { spec: String, reason: String },
}

/// Resolves a device setting. `auto` is CUDA 0 when this build has CUDA and a GPU answers,
/// else the CPU.
pub fn select(spec: &str) -> Result<Device, DeviceError> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" => {
            return Ok(if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            })
        }
        "cuda" => 0,
        other => other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).ok_or_else(|| DeviceError::Unavailable {
            spec: other.into(),
            reason: "unknown device; use auto, cpu, cuda or cuda:N".into(),
        })?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NoCudaBuild(spec.into()));
    }
    Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable { spec: spec.into(), reason: e.to_string() })
}

pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => format!("{:?}", device.location()),
        Device::Metal(_) => "metal".into(),
    }
}
