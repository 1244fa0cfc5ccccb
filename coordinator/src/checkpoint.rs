use crate::{Error, Result};
use candle_core::Device;
use common::{
    dataset::{CLASSES, Split},
    model::ModelKind,
    replica::Replica,
};
use std::{
    fs,
    path::{Path, PathBuf},
};

/// A trained model read back from an epoch checkpoint (`checkpoints/epoch-NNNN.safetensors`),
/// for plotting and prediction.
pub struct Checkpoint {
    /// The safetensors file.
    pub path: PathBuf,
    /// The network the parameters belong to.
    pub model: ModelKind,
    /// The epoch after which it was written, when its `.json` metadata says so.
    pub epoch: Option<u32>,
    /// The digest of the data it was trained on, when its `.json` metadata says so.
    pub dataset_digest: Option<String>,
    /// The parameters in sorted-name order, as [`common::params::ParamSet`] lays them out.
    pub parameters: Vec<f32>,
}

impl Checkpoint {
    /// Reads `path`. The model is the one its `.json` metadata names; a file without
    /// metadata (copied on its own) is matched against every model's names and shapes.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let meta_path = path.with_extension("json");
        let (model, epoch, dataset_digest) = match fs::read_to_string(&meta_path) {
            Ok(text) => {
                let meta: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::Checkpoint(format!("{}: {e}", meta_path.display())))?;
                let model = meta["model"]
                    .as_str()
                    .ok_or_else(|| {
                        Error::Checkpoint(format!("{}: no model name", meta_path.display()))
                    })?
                    .parse::<ModelKind>()?;
                let epoch = meta["epoch"].as_u64().and_then(|e| u32::try_from(e).ok());
                let digest = meta["dataset_digest"].as_str().map(str::to_string);
                (Some(model), epoch, digest)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None, None),
            Err(e) => return Err(Error::io(meta_path, e)),
        };
        if !path.is_file() {
            return Err(Error::Checkpoint(format!(
                "{}: no such checkpoint file",
                path.display()
            )));
        }
        let kinds = match model {
            Some(model) => vec![model],
            None => ModelKind::ALL.to_vec(),
        };
        let mut problems = Vec::new();
        for kind in kinds {
            let replica = Replica::new(kind, &Device::Cpu)?;
            match replica.params().load_safetensors(path) {
                Ok(parameters) => {
                    return Ok(Checkpoint {
                        path: path.to_path_buf(),
                        model: kind,
                        epoch,
                        dataset_digest,
                        parameters,
                    });
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        Err(Error::Checkpoint(if model.is_some() {
            problems.join("; ")
        } else {
            format!(
                "{}: the parameters are not those of any model ({})",
                path.display(),
                ModelKind::ALL.map(ModelKind::name).join(", ")
            )
        }))
    }

    /// The checkpoint of the last epoch in `run_dir`.
    pub fn latest_in(run_dir: &Path) -> Result<Checkpoint> {
        let dir = run_dir.join("checkpoints");
        let entries = fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut latest: Option<(u32, PathBuf)> = None;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let epoch = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_prefix("epoch-"))
                .and_then(|name| name.strip_suffix(".safetensors"))
                .and_then(|number| number.parse::<u32>().ok());
            if let Some(epoch) = epoch
                && latest.as_ref().is_none_or(|(best, _)| epoch > *best)
            {
                latest = Some((epoch, path));
            }
        }
        let (_, path) = latest.ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: no epoch-NNNN.safetensors checkpoint",
                dir.display()
            ))
        })?;
        Checkpoint::load(&path)
    }

    /// The model's class probabilities for every image of `images`, in order, computed on
    /// `device` in batches.
    pub fn probabilities(&self, images: &Split, device: &Device) -> Result<Vec<[f32; CLASSES]>> {
        const BATCH: usize = 500;
        let mut replica = Replica::new(self.model, device)?;
        let mut all = Vec::with_capacity(images.len());
        for start in (0..images.len()).step_by(BATCH) {
            let end = (start + BATCH).min(images.len());
            let (batch, _labels) = images.range_batch(start..end, device)?;
            let probabilities = replica
                .predict(&self.parameters, &batch)
                .and_then(|p| Ok(p.to_device(&Device::Cpu)?.to_vec2::<f32>()?))?;
            all.extend(probabilities.into_iter().map(|row| {
                <[f32; CLASSES]>::try_from(row).expect("the models output one value per class")
            }));
        }
        Ok(all)
    }
}
