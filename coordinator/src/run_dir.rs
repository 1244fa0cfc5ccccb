use crate::{
    Error, Result,
    metrics::{EpochRecord, ProgressRecord},
};
use common::{job::JobConfig, params::ParamSet};
use serde::Serialize;
use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

/// A job's directory: `config.json`, `metrics.jsonl`, `progress.jsonl`, `checkpoints/`,
/// `summary.json`.
pub struct RunDir {
    root: PathBuf,
    metrics: File,
    progress: File,
}

/// What is written beside each checkpoint's safetensors file.
#[derive(Debug, Serialize)]
pub struct CheckpointMeta<'a> {
    pub job_id: &'a str,
    pub epoch: u32,
    pub global_step: u64,
    pub model: &'a str,
    pub parameter_count: usize,
    pub layout_digest: &'a str,
    pub dataset_digest: &'a str,
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub created: String,
    pub job: &'a JobConfig,
}

impl RunDir {
    /// Creates the directory (and `checkpoints/`), writes `config.json` and starts a fresh
    /// `metrics.jsonl`.
    pub fn create(root: &Path, job: &JobConfig) -> Result<RunDir> {
        let checkpoints = root.join("checkpoints");
        fs::create_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
        write_json(&root.join("config.json"), job)?;
        let path = root.join("metrics.jsonl");
        let metrics = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let path = root.join(PROGRESS_FILE);
        let progress = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(RunDir {
            root: root.to_path_buf(),
            metrics,
            progress,
        })
    }

    /// Opens the directory of a job being resumed. `metrics.jsonl` is rewritten to hold
    /// exactly the checkpoint's completed epochs: lines of an epoch that was being finished
    /// when the coordinator died are dropped, since that epoch is finished again.
    /// `progress.jsonl` is appended to: records of steps done again after the restart
    /// repeat their `global_step`.
    pub fn reopen(root: &Path, records: &[EpochRecord]) -> Result<RunDir> {
        let path = root.join("metrics.jsonl");
        let mut text = Vec::new();
        for record in records {
            text.extend(serde_json::to_vec(record).expect("records serialise"));
            text.push(b'\n');
        }
        let temporary = path.with_extension("jsonl.tmp");
        fs::write(&temporary, text).map_err(|e| Error::io(&temporary, e))?;
        fs::rename(&temporary, &path).map_err(|e| Error::io(&path, e))?;
        let metrics = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let path = root.join(PROGRESS_FILE);
        let progress = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(RunDir {
            root: root.to_path_buf(),
            metrics,
            progress,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Appends one epoch to `metrics.jsonl`, flushed so that a reader sees whole lines.
    pub fn record(&mut self, record: &EpochRecord) -> Result<()> {
        let path = self.root.join("metrics.jsonl");
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        self.metrics
            .write_all(&line)
            .and_then(|()| self.metrics.flush())
            .map_err(|e| Error::io(path, e))
    }

    /// Appends a progress record to `progress.jsonl`, flushed.
    pub fn progress(&mut self, record: &ProgressRecord) -> Result<()> {
        let path = self.root.join(PROGRESS_FILE);
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        self.progress
            .write_all(&line)
            .and_then(|()| self.progress.flush())
            .map_err(|e| Error::io(path, e))
    }

    /// Writes `checkpoints/epoch-NNNN.safetensors` and its `.json` metadata, each atomically.
    pub fn checkpoint(
        &self,
        params: &ParamSet,
        flat: &[f32],
        meta: &CheckpointMeta<'_>,
    ) -> Result<PathBuf> {
        let stem = self
            .root
            .join("checkpoints")
            .join(format!("epoch-{:04}", meta.epoch));
        let tensors = stem.with_extension("safetensors");
        params.save_safetensors(flat, &tensors)?;
        write_json(&stem.with_extension("json"), meta)?;
        Ok(tensors)
    }

    /// Where the resume checkpoint lives.
    pub fn resume_path(&self) -> PathBuf {
        self.root.join("checkpoints").join(crate::resume::FILE_NAME)
    }

    /// Writes `summary.json`.
    pub fn write_summary(&self, summary: &impl Serialize) -> Result<()> {
        write_json(&self.root.join("summary.json"), summary)
    }
}

/// The running record of training, apart from `metrics.jsonl` so that readers of the epoch
/// records see one line per epoch, as they always did.
const PROGRESS_FILE: &str = "progress.jsonl";

/// Writes pretty JSON through a temporary file and a rename, so readers never see half a file.
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let temporary = path.with_extension("json.tmp");
    let mut text = serde_json::to_string_pretty(value).expect("values serialise");
    text.push('\n');
    fs::write(&temporary, text).map_err(|e| Error::io(&temporary, e))?;
    fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
}
