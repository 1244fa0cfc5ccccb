//! Where a model computes, as the programs' `--device` flags name it.

use crate::{Error, Result};
use candle_core::Device;

/// The device named `cpu` or `cuda:N`: the workers' `--device`, the coordinator's
/// `--worker-device` and `predict --device`. A CUDA device needs a build with the `cuda`
/// feature.
pub fn parse_device(name: &str) -> Result<Device> {
    let unusable = |problem: String| Error::Device {
        name: name.into(),
        problem,
    };
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = name.strip_prefix("cuda:").and_then(|n| n.parse().ok()) else {
        return Err(unusable("expected cpu or cuda:N".into()));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(unusable(
            "this build has no CUDA support (build with --features cuda)".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| unusable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_cpu_or_cuda_with_an_ordinal() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        for name in ["gpu", "cuda", "cuda:x", "CPU"] {
            let error = parse_device(name).unwrap_err();
            assert!(
                matches!(&error, Error::Device { name: n, .. } if n == name),
                "{error}"
            );
            assert!(error.to_string().starts_with(&format!("device '{name}': ")));
        }
    }
}
