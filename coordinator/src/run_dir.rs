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
    /// `progress.jsonl` keeps the records up to `global_step`, where training resumes, so
    /// that its steps still only climb; the steps done after it are done again and recorded
    /// again. A torn last line, from a coordinator killed mid-write, goes too.
    pub fn reopen(root: &Path, records: &[EpochRecord], global_step: u64) -> Result<RunDir> {
        let mut text = Vec::new();
        for record in records {
            text.extend(serde_json::to_vec(record).expect("records serialise"));
            text.push(b'\n');
        }
        let metrics = rewrite_for_appending(&root.join("metrics.jsonl"), &text)?;
        let path = root.join(PROGRESS_FILE);
        let kept = match fs::read_to_string(&path) {
            Ok(text) => progress_up_to(&text, global_step),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let progress = rewrite_for_appending(&path, kept.as_bytes())?;
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
        check_finite(&path, record)?;
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
        check_finite(&path, record)?;
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

/// Replaces the file at `path` with `contents` (through a temporary file and a rename) and
/// opens it for appending.
fn rewrite_for_appending(path: &Path, contents: &[u8]) -> Result<File> {
    let temporary = path.with_extension("jsonl.tmp");
    fs::write(&temporary, contents).map_err(|e| Error::io(&temporary, e))?;
    fs::rename(&temporary, path).map_err(|e| Error::io(path, e))?;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// The whole lines of `progress.jsonl` text whose record is at or before `global_step`.
fn progress_up_to(text: &str, global_step: u64) -> String {
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter(|line| {
            serde_json::from_str::<ProgressRecord>(line)
                .is_ok_and(|record| record.global_step <= global_step)
        })
        .collect()
}

/// Refuses a value holding NaN or infinity, which serde_json would write as `null`.
pub fn check_finite(path: &Path, value: &impl Serialize) -> Result<()> {
    match crate::finite::non_finite_field(value) {
        Some(field) => Err(Error::NonFinite {
            path: path.to_path_buf(),
            field,
        }),
        None => Ok(()),
    }
}

/// Writes pretty JSON through a temporary file and a rename, so readers never see half a file.
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    check_finite(path, value)?;
    let temporary = path.with_extension("json.tmp");
    let mut text = serde_json::to_string_pretty(value).expect("values serialise");
    text.push('\n');
    fs::write(&temporary, text).map_err(|e| Error::io(&temporary, e))?;
    fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(global_step: u64) -> ProgressRecord {
        ProgressRecord {
            kind: "progress".into(),
            time: global_step as f64,
            epoch: 1,
            step: global_step,
            global_step,
            samples: 64 * global_step,
            train_loss: 0.5,
            epoch_train_loss: 0.5,
            images_per_sec: 1000.0,
            workers: 2,
            lr: 0.05,
        }
    }

    fn steps(root: &Path) -> Vec<u64> {
        fs::read_to_string(root.join(PROGRESS_FILE))
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<ProgressRecord>(line)
                    .unwrap()
                    .global_step
            })
            .collect()
    }

    /// A coordinator killed at step 35 after a checkpoint at step 20: the records of steps 30
    /// and 35 go (they are done again), and so does a half-written line.
    #[test]
    fn resuming_keeps_progress_up_to_the_checkpoint_and_drops_a_torn_line() {
        let root = tempfile::tempdir().unwrap();
        let job = JobConfig::default();
        let mut run = RunDir::create(root.path(), &job).unwrap();
        for step in [10, 20, 30, 35] {
            run.progress(&record(step)).unwrap();
        }
        drop(run);
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(root.path().join(PROGRESS_FILE))
            .unwrap();
        file.write_all(br#"{"kind":"progress","time":40.0,"ep"#)
            .unwrap();
        drop(file);

        let mut run = RunDir::reopen(root.path(), &[], 20).unwrap();
        assert_eq!(steps(root.path()), [10, 20]);
        run.progress(&record(25)).unwrap();
        assert_eq!(steps(root.path()), [10, 20, 25]);
    }

    /// A NaN would be written as `null`, which the plots and `--resume` cannot read: the
    /// record is refused, naming the field, and the file keeps its whole lines.
    #[test]
    fn records_with_non_finite_numbers_are_refused_and_not_written() {
        let root = tempfile::tempdir().unwrap();
        let mut run = RunDir::create(root.path(), &JobConfig::default()).unwrap();
        run.progress(&record(10)).unwrap();
        let error = run
            .progress(&ProgressRecord {
                train_loss: f64::INFINITY,
                ..record(20)
            })
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("train_loss is not a finite number"),
            "{error}"
        );
        assert_eq!(steps(root.path()), [10]);
        let error = run
            .write_summary(&serde_json::json!({ "ok": 1.0 }))
            .map(|()| run.write_summary(&[0.5, f64::NAN]))
            .unwrap()
            .unwrap_err();
        assert!(
            error.to_string().contains("[1] is not a finite number"),
            "{error}"
        );
        let summary = fs::read_to_string(root.path().join("summary.json")).unwrap();
        assert!(
            summary.contains("\"ok\"") && !summary.contains("null"),
            "{summary}"
        );
    }

    #[test]
    fn resuming_a_run_without_progress_starts_the_file() {
        let root = tempfile::tempdir().unwrap();
        let mut run = RunDir::reopen(root.path(), &[], 7).unwrap();
        run.progress(&record(8)).unwrap();
        assert_eq!(steps(root.path()), [8]);
    }
}
