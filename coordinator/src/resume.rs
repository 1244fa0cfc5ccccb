//! The resume checkpoint: everything a restarted coordinator needs to carry on exactly where
//! the job was, in one safetensors file (`checkpoints/resume.safetensors`) replaced
//! atomically. Tensors hold the parameters, the optimiser's buffers and the epoch's remaining
//! samples; the metadata entry `state` holds the rest as JSON.
//!
//! There is no random-number state to save: every random choice (initial parameters, epoch
//! order, dropout masks) is derived from the job seed and the epoch or step number.

use crate::{Error, Result, metrics::EpochRecord, progress::EpochProgress};
use common::{job::JobConfig, optim::OptimizerState};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, io::Write, path::Path};

/// Bumped when the layout of the file changes.
pub const FORMAT: u32 = 1;

/// File name inside `checkpoints/`.
pub const FILE_NAME: &str = "resume.safetensors";

/// The JSON part of the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeState {
    pub format: u32,
    pub job_id: String,
    pub job: JobConfig,
    pub layout_digest: String,
    pub dataset_digest: String,
    /// Steps applied since the start of the job.
    pub global_step: u64,
    /// The epoch in progress (its `remaining` samples are the `remaining` tensor).
    pub progress: EpochProgress,
    /// The completed epochs, as in `metrics.jsonl`.
    pub records: Vec<EpochRecord>,
    /// Worker ids continue from here, so that no id is reused within the job.
    pub next_worker_id: u64,
    /// Optimiser steps applied and buffer length (the buffers are tensors).
    pub optimizer_step: u64,
    pub optimizer_len: usize,
    /// Seconds of training before this checkpoint, across restarts.
    pub wall_seconds: f64,
    pub created: String,
}

/// A whole checkpoint.
#[derive(Debug, Clone)]
pub struct Resume {
    pub state: ResumeState,
    pub parameters: Vec<f32>,
    pub optimizer: OptimizerState,
}

impl Resume {
    /// Writes the checkpoint to `path` through a temporary file in the same directory that is
    /// synced before it is renamed over the old one, so a crash leaves the old checkpoint or
    /// the new one, never a mixture.
    pub fn save(&self, path: &Path) -> Result<()> {
        let remaining: Vec<u32> = self.state.progress.remaining.iter().copied().collect();
        crate::run_dir::check_finite(path, &self.state)?;
        let state = serde_json::to_string(&self.state).expect("resume state serialises");
        let bytes = {
            let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let parameters = f32_bytes(&self.parameters);
            let first = f32_bytes(&self.optimizer.first_moment);
            let second = f32_bytes(&self.optimizer.second_moment);
            let order: Vec<u8> = remaining.iter().flat_map(|x| x.to_le_bytes()).collect();
            let tensors = [
                ("parameters", view(Dtype::F32, &parameters)),
                ("optimizer.first_moment", view(Dtype::F32, &first)),
                ("optimizer.second_moment", view(Dtype::F32, &second)),
                ("remaining", view(Dtype::U32, &order)),
            ];
            let metadata = HashMap::from([("state".to_string(), state)]);
            safetensors::serialize(tensors, Some(metadata))
                .map_err(|e| Error::Checkpoint(format!("cannot encode the checkpoint: {e}")))?
        };
        write_atomically(path, &bytes)
    }

    /// Reads a checkpoint written by [`save`](Self::save), checking that its parts fit
    /// together.
    pub fn load(path: &Path) -> Result<Resume> {
        let bad = |problem: String| Error::Checkpoint(format!("{}: {problem}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("state"))
            .ok_or_else(|| bad("no `state` metadata".into()))?;
        let mut state: ResumeState =
            serde_json::from_str(json).map_err(|e| bad(format!("unreadable state: {e}")))?;
        if state.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT})",
                state.format
            )));
        }
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let read = |name: &str, dtype: Dtype| -> Result<Vec<[u8; 4]>> {
            let view = tensors
                .tensor(name)
                .map_err(|e| bad(format!("tensor {name}: {e}")))?;
            if view.dtype() != dtype {
                return Err(bad(format!(
                    "tensor {name} is {:?}, not {dtype:?}",
                    view.dtype()
                )));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|c| c.try_into().expect("4 bytes"))
                .collect())
        };
        let floats = |name: &str| -> Result<Vec<f32>> {
            Ok(read(name, Dtype::F32)?
                .into_iter()
                .map(f32::from_le_bytes)
                .collect())
        };
        let parameters = floats("parameters")?;
        let optimizer = OptimizerState {
            len: state.optimizer_len,
            step: state.optimizer_step,
            first_moment: floats("optimizer.first_moment")?,
            second_moment: floats("optimizer.second_moment")?,
        };
        state.progress.remaining = read("remaining", Dtype::U32)?
            .into_iter()
            .map(u32::from_le_bytes)
            .collect();
        if parameters.len() != state.optimizer_len {
            return Err(bad(format!(
                "{} parameters but optimiser state for {}",
                parameters.len(),
                state.optimizer_len
            )));
        }
        Ok(Resume {
            state,
            parameters,
            optimizer,
        })
    }
}

/// A one-dimensional tensor over `data`, whose elements are 4 bytes wide.
fn view(dtype: Dtype, data: &[u8]) -> TensorView<'_> {
    TensorView::new(dtype, vec![data.len() / 4], data).expect("the length fits the shape")
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temporary = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    temporary
        .write_all(bytes)
        .and_then(|()| temporary.as_file().sync_all())
        .map_err(|e| Error::io(temporary.path(), e))?;
    fail::fail_point!("checkpoint-before-rename", |_| Err(Error::Checkpoint(
        "failpoint checkpoint-before-rename".into()
    )));
    temporary
        .persist(path)
        .map_err(|e| Error::io(path, e.error))?;
    // The rename is durable only once the directory entry is.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Departure;
    use common::{model::ModelKind, optim::OptimizerConfig};

    fn sample() -> Resume {
        let job = JobConfig {
            model: ModelKind::Mlp,
            epochs: 3,
            batch_size: 16,
            workers: 2,
            seed: 9,
            optimizer: OptimizerConfig::default(),
            lr: 0.05,
            lr_reference_batch: Some(64),
            warmup_steps: 5,
            cosine_decay: true,
            max_steps: None,
        };
        let mut progress = EpochProgress {
            epoch: 2,
            count: 320,
            loss_sum: 12.5,
            correct: 300,
            steps: 10,
            lost: vec![Departure {
                worker: "w3".into(),
                step: 41,
                reason: "silent".into(),
            }],
            ..EpochProgress::default()
        };
        progress.remaining = [5u32, 1, 4, 1_000_000].into_iter().collect();
        Resume {
            state: ResumeState {
                format: FORMAT,
                job_id: "mlp-test".into(),
                job,
                layout_digest: "abc".into(),
                dataset_digest: "def".into(),
                global_step: 42,
                progress,
                records: Vec::new(),
                next_worker_id: 7,
                optimizer_step: 42,
                optimizer_len: 3,
                wall_seconds: 1.5,
                created: "now".into(),
            },
            parameters: vec![1.0, -0.0, f32::MIN_POSITIVE],
            optimizer: OptimizerState {
                len: 3,
                step: 42,
                first_moment: vec![0.5, 0.25, -3.0],
                second_moment: Vec::new(),
            },
        }
    }

    #[test]
    fn a_saved_checkpoint_loads_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let saved = sample();
        saved.save(&path).unwrap();
        let loaded = Resume::load(&path).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&loaded.parameters), bits(&saved.parameters));
        assert_eq!(loaded.optimizer, saved.optimizer);
        assert_eq!(
            loaded.state.progress.remaining,
            saved.state.progress.remaining
        );
        assert_eq!(loaded.state.progress.lost, saved.state.progress.lost);
        assert_eq!(loaded.state.global_step, 42);
        assert_eq!(loaded.state.next_worker_id, 7);
        assert_eq!(loaded.state.job, saved.state.job);
        // Saving again replaces the file and leaves nothing else behind.
        saved.save(&path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn damaged_checkpoints_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        sample().save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let error = Resume::load(&path).unwrap_err().to_string();
        assert!(error.contains(FILE_NAME), "{error}");

        let mut inconsistent = sample();
        inconsistent.state.optimizer_len = 4;
        inconsistent.save(&path).unwrap();
        let error = Resume::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("3 parameters but optimiser state for 4"),
            "{error}"
        );
    }

    /// The previous checkpoint stays when the new state holds a number JSON cannot: written,
    /// it would be `null`, and `--resume` would refuse the file.
    #[test]
    fn a_state_with_a_non_finite_sum_is_refused_and_the_old_checkpoint_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        sample().save(&path).unwrap();
        let mut poisoned = sample();
        poisoned.state.progress.loss_sum = f64::INFINITY;
        poisoned.state.global_step = 43;
        let error = poisoned.save(&path).unwrap_err().to_string();
        assert!(
            error.contains("progress.loss_sum is not a finite number"),
            "{error}"
        );
        assert_eq!(Resume::load(&path).unwrap().state.global_step, 42);
    }
}
