use crate::{Error, Result};
use candle_core::Device;

/// The device named `cpu` or `cuda:N`, as the worker's `--device` takes it.
pub fn parse_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = name.strip_prefix("cuda:").and_then(|n| n.parse().ok()) else {
        return Err(Error::Config(format!(
            "--device {name}: expected cpu or cuda:N"
        )));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Config(format!(
            "--device {name}: this build has no CUDA support (build with --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Config(format!("--device {name}: {e}")))
}
