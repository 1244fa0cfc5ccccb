//! A model's variables as one flat buffer in a stable order.

use crate::seed::derive_rng;
use crate::simd::{Isa, multiversion};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand_chacha::rand_core::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// A model's variables in one fixed order: sorted by name.
///
/// `VarMap` keeps its variables in a `HashMap`, whose iteration order differs from process to
/// process. Every buffer that crosses a process boundary or enters a reduction is laid out by
/// this type instead, so that float `i` means the same parameter on every rank.
#[derive(Debug, Clone)]
pub struct ParamSet {
    vars: Vec<(String, Var)>,
    len: usize,
}

impl ParamSet {
    /// Takes every variable of `varmap`, sorted by name. The variables are shared, not copied:
    /// [`load_flat`](Self::load_flat) changes what the model computes with.
    pub fn from_varmap(varmap: &VarMap) -> ParamSet {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let len = vars.iter().map(|(_, var)| var.elem_count()).sum();
        ParamSet { vars, len }
    }

    /// The number of floats in a flat buffer: all the model's parameters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the model has no parameters at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each variable's name and shape, in flat-buffer order.
    pub fn layout(&self) -> Vec<(String, Vec<usize>)> {
        self.vars
            .iter()
            .map(|(name, var)| (name.clone(), var.dims().to_vec()))
            .collect()
    }

    /// Hex SHA-256 of the layout: two processes whose digests agree read each other's flat
    /// buffers correctly.
    pub fn layout_digest(&self) -> String {
        let mut hasher = Sha256::new();
        // Lengths go in before contents so that no two layouts hash the same bytes.
        for (name, dims) in self.layout() {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((dims.len() as u64).to_le_bytes());
            for dim in dims {
                hasher.update((dim as u64).to_le_bytes());
            }
        }
        hex::encode(hasher.finalize())
    }

    /// The current parameter values, as `f32`.
    pub fn to_flat(&self) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(self.len);
        for (_, var) in &self.vars {
            flat.extend(to_f32_vec(var.as_tensor())?);
        }
        Ok(flat)
    }

    /// Sets every variable from a flat buffer laid out as [`to_flat`](Self::to_flat) returns it.
    pub fn load_flat(&self, flat: &[f32]) -> Result<()> {
        self.check_len("parameters", flat)?;
        let mut offset = 0;
        for (_, var) in &self.vars {
            let n = var.elem_count();
            let value = Tensor::from_slice(&flat[offset..offset + n], var.shape(), var.device())?
                .to_dtype(var.dtype())?;
            var.set(&value)?;
            offset += n;
        }
        Ok(())
    }

    /// The gradient of every variable in flat-buffer order, with zeros for variables that the
    /// loss does not depend on.
    pub fn grads_flat(&self, grads: &GradStore) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(self.len);
        for (_, var) in &self.vars {
            match grads.get(var.as_tensor()) {
                Some(grad) => flat.extend(to_f32_vec(grad)?),
                None => flat.resize(flat.len() + var.elem_count(), 0.0),
            }
        }
        Ok(flat)
    }

    /// PyTorch's default initialisation, drawn from the job seed rather than candle's generator:
    /// every value uniform in `(-1/sqrt(fan_in), 1/sqrt(fan_in))`, where `fan_in` is the product
    /// of a weight's dimensions but the first, and a bias `X.bias` takes the fan-in of `X.weight`.
    ///
    /// Each tensor has a stream of its own, so changing one layer leaves the others' values as
    /// they were.
    pub fn init_flat(&self, seed: u64) -> Vec<f32> {
        let fan_in = |dims: &[usize]| dims.iter().skip(1).product::<usize>().max(1);
        let fan_ins: HashMap<&str, usize> = self
            .vars
            .iter()
            .map(|(name, var)| (name.as_str(), fan_in(var.dims())))
            .collect();
        let mut flat = Vec::with_capacity(self.len);
        for (index, (name, var)) in self.vars.iter().enumerate() {
            let weight = name
                .strip_suffix(".bias")
                .map(|layer| format!("{layer}.weight"));
            let fan_in = weight
                .and_then(|weight| fan_ins.get(weight.as_str()).copied())
                .unwrap_or_else(|| fan_in(var.dims()));
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut rng = derive_rng(seed, "init", &[index as u64]);
            flat.extend((0..var.elem_count()).map(|_| {
                // 53 random bits give a uniform value in [0, 1) exactly; the `rand` crate's
                // conversions may change between versions, this may not.
                let unit = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                ((2.0 * unit - 1.0) * bound) as f32
            }));
        }
        flat
    }

    /// Writes `flat` as a safetensors file with one tensor per variable, atomically: a reader
    /// sees the old file or the new one, never half of one.
    pub fn save_safetensors(&self, flat: &[f32], path: &Path) -> Result<()> {
        self.check_len("parameters", flat)?;
        let mut tensors = HashMap::new();
        let mut offset = 0;
        for (name, var) in &self.vars {
            let n = var.elem_count();
            let tensor = Tensor::from_slice(&flat[offset..offset + n], var.shape(), &Device::Cpu)?;
            tensors.insert(name.clone(), tensor);
            offset += n;
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        candle_core::safetensors::save(&tensors, temp.path())?;
        temp.as_file()
            .sync_all()
            .map_err(|e| Error::io(temp.path(), e))?;
        temp.persist(path).map_err(|e| Error::io(path, e.error))?;
        Ok(())
    }

    /// Reads a file written by [`save_safetensors`](Self::save_safetensors) back into a flat
    /// buffer, refusing files whose tensors are not exactly this model's names and shapes.
    pub fn load_safetensors(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let mismatch = |problem: String| {
            Error::Config(format!(
                "{}: not a checkpoint of this model: {problem}",
                path.display()
            ))
        };
        let mut flat = Vec::with_capacity(self.len);
        for (name, var) in &self.vars {
            let tensor = tensors
                .get(name)
                .ok_or_else(|| mismatch(format!("tensor {name} is missing")))?;
            if tensor.dims() != var.dims() {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?}, the model has {:?}",
                    tensor.dims(),
                    var.dims()
                )));
            }
            flat.extend(to_f32_vec(tensor)?);
        }
        if tensors.len() != self.vars.len() {
            let mut extra: Vec<&String> = tensors
                .keys()
                .filter(|name| !self.vars.iter().any(|(own, _)| own == *name))
                .collect();
            extra.sort();
            return Err(mismatch(format!("unexpected tensors {extra:?}")));
        }
        Ok(flat)
    }

    fn check_len(&self, what: &'static str, flat: &[f32]) -> Result<()> {
        if flat.len() == self.len {
            Ok(())
        } else {
            Err(Error::Length {
                what,
                expected: self.len,
                actual: flat.len(),
            })
        }
    }
}

fn to_f32_vec(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// Fails with [`Error::NonFinite`] at the first NaN or infinity in `values`, so that a diverged
/// step is caught before it spreads to every replica.
pub fn check_finite(what: &'static str, values: &[f32]) -> Result<()> {
    if all_finite(Isa::current(), values) {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: values[index],
        }),
    }
}

multiversion! {
    /// Whether every value is finite: one pass without an early exit, which vectorises (the
    /// search for the culprit runs only on failure).
    fn all_finite(values: &[f32]) -> bool {
        values.iter().fold(true, |finite, v| finite & v.is_finite())
    }
}

/// The L2 norm of `values`, squares summed in f64 in eight fixed lanes: the same bits on
/// every instruction-set path, so that ring members judging one summed gradient agree.
pub fn l2_norm(values: &[f32]) -> f64 {
    sum_of_squares(Isa::current(), values).sqrt()
}

multiversion! {
    /// Sum of squares in f64, lane `i` taking every eighth value from `i`, then the lanes in
    /// order; without fused multiply-adds, so that every path rounds alike.
    fn sum_of_squares(values: &[f32]) -> f64 {
        let mut lanes = [0f64; 8];
        let chunks = values.chunks_exact(8);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f64::from(v) * f64::from(v);
            }
        }
        for (lane, &v) in lanes.iter_mut().zip(rest) {
            *lane += f64::from(v) * f64::from(v);
        }
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelKind, Network};
    use candle_nn::VarBuilder;

    fn params(kind: ModelKind) -> ParamSet {
        let varmap = VarMap::new();
        Network::build(
            kind,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        ParamSet::from_varmap(&varmap)
    }

    #[test]
    fn l2_norm_is_exact_where_it_can_be_and_alike_on_every_path() {
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(l2_norm(&[]), 0.0);
        let max = f64::from(f32::MAX) * 2f64.sqrt();
        assert!(
            (l2_norm(&[f32::MAX; 2]) - max).abs() <= max * 1e-15,
            "no overflow"
        );
        let values: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 1e-3).collect();
        let plain = values
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((l2_norm(&values) - plain).abs() <= plain * 1e-12);
        let portable = sum_of_squares(Isa::Portable, &values);
        for isa in Isa::supported() {
            assert_eq!(
                sum_of_squares(isa, &values).to_bits(),
                portable.to_bits(),
                "{isa:?}"
            );
        }
    }

    #[test]
    fn layout_is_sorted_and_stable_across_builds() {
        for kind in ModelKind::ALL {
            let (a, b) = (params(kind), params(kind));
            assert_eq!(a.layout(), b.layout());
            assert_eq!(a.layout_digest(), b.layout_digest());
            let names: Vec<String> = a.layout().into_iter().map(|(name, _)| name).collect();
            assert!(names.is_sorted(), "{kind}: {names:?}");
        }
        assert_ne!(
            params(ModelKind::Mlp).layout_digest(),
            params(ModelKind::Cnn).layout_digest()
        );
        assert_eq!(
            params(ModelKind::Softmax).layout(),
            vec![
                ("fc.bias".to_string(), vec![10]),
                ("fc.weight".to_string(), vec![10, 784])
            ]
        );
    }

    #[test]
    fn flat_buffers_round_trip() {
        let p = params(ModelKind::Lenet);
        let flat = p.init_flat(3);
        assert_eq!(flat.len(), p.len());
        p.load_flat(&flat).unwrap();
        assert_eq!(p.to_flat().unwrap(), flat);
        let err = p.load_flat(&flat[1..]).unwrap_err();
        assert!(
            matches!(err, Error::Length { expected, actual, .. } if expected == p.len() && actual == p.len() - 1)
        );
    }

    #[test]
    fn init_is_deterministic_and_bounded_by_fan_in() {
        let p = params(ModelKind::Lenet);
        let a = p.init_flat(11);
        assert_eq!(a, p.init_flat(11));
        assert_ne!(a, p.init_flat(12));
        // Layout: conv1.bias [20], conv1.weight [20,1,5,5], ...; conv1's fan-in is 25.
        let conv1 = &a[..20 + 500];
        let max = conv1.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max < 0.2 && max > 0.18, "conv1 values reach {max}");
        // fc2.bias [10] comes after fc1.* and conv*; its fan-in is fc2.weight's 500.
        let offset = p
            .layout()
            .iter()
            .take_while(|(name, _)| name != "fc2.bias")
            .map(|(_, d)| d.iter().product::<usize>())
            .sum::<usize>();
        let bound = 1.0 / 500f32.sqrt();
        assert!(a[offset..offset + 10].iter().all(|v| v.abs() < bound));
    }

    #[test]
    fn gradients_of_unused_variables_are_zero() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let used = vb.get(3, "a").unwrap();
        vb.get(2, "b").unwrap();
        let p = ParamSet::from_varmap(&varmap);
        p.load_flat(&[1., 2., 3., 4., 5.]).unwrap();
        let grads = used.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(p.grads_flat(&grads).unwrap(), vec![2., 4., 6., 0., 0.]);
    }

    #[test]
    fn safetensors_round_trip_and_refuse_other_models() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let p = params(ModelKind::Cnn);
        let flat = p.init_flat(5);
        p.save_safetensors(&flat, &path).unwrap();
        assert_eq!(p.load_safetensors(&path).unwrap(), flat);
        // Overwriting goes through a rename and leaves no temporary files behind.
        p.save_safetensors(&p.init_flat(6), &path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let err = params(ModelKind::Softmax)
            .load_safetensors(&path)
            .unwrap_err();
        assert!(err.to_string().contains("is missing"), "{err}");
        let err = params(ModelKind::Lenet)
            .load_safetensors(&path)
            .unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        assert!(matches!(
            p.load_safetensors(&dir.path().join("absent")),
            Err(Error::Io { .. })
        ));
    }

    /// Every instruction set agrees on every position of a NaN or an infinity.
    #[test]
    fn every_instruction_set_finds_the_same_non_finite_values() {
        let mut values: Vec<f32> = (0..1000).map(|i| i as f32 - 500.0).collect();
        for isa in Isa::supported() {
            assert!(all_finite(isa, &values), "{isa}");
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 15, 16, 999] {
                let old = std::mem::replace(&mut values[at], bad);
                for isa in Isa::supported() {
                    assert!(!all_finite(isa, &values), "{isa}: {bad} at {at}");
                }
                values[at] = old;
            }
        }
    }

    #[test]
    fn check_finite_reports_the_first_bad_value() {
        check_finite("gradient", &[0.0, -1.0, 1e30]).unwrap();
        let err = check_finite("gradient", &[0.0, f32::NAN, f32::INFINITY]).unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 1, .. }));
    }
}
