//! In-process failure cases driven by failpoints (the `fail` crate): process-global, so
//! they live in this binary of their own, built with `--features failpoints`.
//!
//! Each test is a whole job over real gRPC on loopback, on real MNIST, with a failpoint in
//! the coordinator: on a worker's gradient answer in flight (`service.rs`) or between
//! writing the resume checkpoint and renaming it into place (`resume.rs`).

// `binary` and `mnist_dir` serve the `it` binary's process tests.
#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

use anyhow::Context;
use common::model::ModelKind;
use std::path::Path;
use support::{init_logging, test_config, train_in_process};
use tracing::info;

/// Images in an MNIST training epoch.
const TRAIN_IMAGES: u64 = 60_000;

/// Two workers, one epoch of the MLP, 250 images per worker and step (120 steps). The
/// timeout is short, so that an eviction costs little, and long enough that a loaded
/// machine does not evict a worker that is merely slow.
fn job(run_dir: &Path) -> coordinator::Config {
    coordinator::Config {
        workers: 2,
        model: ModelKind::Mlp,
        epochs: 1,
        batch_size: 250,
        worker_timeout: 2.0,
        ..test_config(run_dir)
    }
}

fn bits(parameters: &[f32]) -> Vec<u32> {
    parameters.iter().map(|v| v.to_bits()).collect()
}

fn configure(name: &str, actions: &str) -> anyhow::Result<()> {
    fail::cfg(name, actions).map_err(|e| anyhow::anyhow!("failpoint {name}: {e}"))
}

/// Whether a failpoint configured as `N*action` has fired all N times, so that a test
/// cannot pass because its fault never happened. (`eval` is what `fail_point!` calls.)
fn used_up(name: &str) -> bool {
    fail::eval(name, |_| ()).is_none()
}

/// The JSON `state` of a resume checkpoint, read from the safetensors header.
fn checkpoint_state(path: &Path) -> anyhow::Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let header_len = bytes
        .first_chunk::<8>()
        .map(|n| u64::from_le_bytes(*n) as usize)
        .context("shorter than a safetensors header")?;
    let header = bytes
        .get(8..8 + header_len)
        .context("header longer than the file")?;
    let header: serde_json::Value = serde_json::from_slice(header)?;
    let state = header["__metadata__"]["state"]
        .as_str()
        .context("no `state` metadata")?;
    Ok(serde_json::from_str(state)?)
}

/// A lost gradient answer: the worker is evicted as a straggler, the step completes without
/// it, its samples are trained on later in the epoch, and the worker rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_report_evicts_the_worker_and_requeues_its_samples() -> anyhow::Result<()> {
    init_logging();
    let scenario = fail::FailScenario::setup();
    let runs = tempfile::tempdir()?;
    configure("report-drop", "1*return")?;
    let summary = train_in_process(job(runs.path()), None).await?;
    scenario.teardown();

    assert_eq!(summary.epochs.len(), 1);
    let epoch = &summary.epochs[0];
    assert_eq!(epoch.workers_lost.len(), 1, "{:?}", epoch.workers_lost);
    let lost = &epoch.workers_lost[0];
    assert!(lost.reason.contains("straggler"), "{lost:?}");
    assert_eq!(lost.step, 0, "the first answer of the job is the one lost");
    assert_eq!(
        epoch.samples_requeued, 250,
        "the lost worker's part of the batch"
    );
    assert_eq!(epoch.samples, TRAIN_IMAGES, "every image exactly once");
    assert_eq!(epoch.test_samples, 10_000);
    assert_eq!(epoch.workers_joined.len(), 1, "{:?}", epoch.workers_joined);
    assert_ne!(
        epoch.workers_joined[0].worker, lost.worker,
        "rejoins under a new id"
    );
    assert_eq!(epoch.workers, 2);
    assert!(epoch.test_accuracy > 0.8, "{}", epoch.test_accuracy);
    Ok(())
}

/// Answers held back for less than the timeout: nobody is evicted, and since gradients are
/// combined in rank order, not arrival order, the parameters are bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_reports_change_nothing() -> anyhow::Result<()> {
    init_logging();
    let scenario = fail::FailScenario::setup();
    let runs = tempfile::tempdir()?;
    let short = |name: &str| coordinator::Config {
        max_steps: Some(30),
        ..job(&runs.path().join(name))
    };

    info!("--- plain");
    let plain = train_in_process(short("plain"), None).await?;
    info!("--- ten answers 200 ms late");
    configure("report-delay", "10*return(200)")?;
    let delayed = train_in_process(short("delayed"), None).await?;
    assert!(used_up("report-delay"), "the delay must have happened");
    scenario.teardown();

    assert_eq!(delayed.steps, 30);
    let epoch = &delayed.epochs[0];
    assert!(epoch.workers_lost.is_empty(), "{:?}", epoch.workers_lost);
    assert_eq!(epoch.samples_requeued, 0);
    assert_eq!(epoch.samples, plain.epochs[0].samples);
    assert_eq!(bits(&delayed.parameters), bits(&plain.parameters));
    Ok(())
}

/// Every answer arriving twice: the second is ignored, so every image counts once and the
/// parameters are bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_reports_are_counted_once() -> anyhow::Result<()> {
    init_logging();
    let scenario = fail::FailScenario::setup();
    let runs = tempfile::tempdir()?;

    info!("--- plain");
    let plain = train_in_process(job(&runs.path().join("plain")), None).await?;
    info!("--- 200 of the 240 answers twice");
    configure("report-duplicate", "200*return")?;
    let doubled = train_in_process(job(&runs.path().join("doubled")), None).await?;
    assert!(
        used_up("report-duplicate"),
        "the duplicates must have been sent"
    );
    scenario.teardown();

    let epoch = &doubled.epochs[0];
    assert_eq!(epoch.samples, TRAIN_IMAGES);
    assert_eq!(epoch.steps, 120);
    assert!(epoch.workers_lost.is_empty(), "{:?}", epoch.workers_lost);
    assert_eq!(
        epoch.train_loss.to_bits(),
        plain.epochs[0].train_loss.to_bits()
    );
    assert_eq!(bits(&doubled.parameters), bits(&plain.parameters));
    Ok(())
}

/// A crash between writing a resume checkpoint and renaming it into place: the job stops,
/// the previous checkpoint is intact and alone, and resuming from it finishes the epoch
/// exactly as an uninterrupted job does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_checkpoint_rename_keeps_the_previous_checkpoint() -> anyhow::Result<()> {
    init_logging();
    let scenario = fail::FailScenario::setup();
    let runs = tempfile::tempdir()?;
    let every_20 = |name: &str| coordinator::Config {
        checkpoint_every: 20,
        ..job(&runs.path().join(name))
    };
    let run_dir = runs.path().join("crashed");
    let checkpoints = run_dir.join("checkpoints");

    info!("--- the third checkpoint (step 60) fails before its rename");
    configure("checkpoint-before-rename", "2*off->return")?;
    let error = train_in_process(every_20("crashed"), None)
        .await
        .expect_err("the job stops at the failed checkpoint");
    fail::remove("checkpoint-before-rename");
    assert!(
        matches!(
            error.downcast_ref::<coordinator::Error>(),
            Some(coordinator::Error::Checkpoint(message)) if message.contains("checkpoint-before-rename")
        ),
        "{error:#}"
    );
    let mut entries: Vec<String> = std::fs::read_dir(&checkpoints)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    assert_eq!(
        entries,
        ["resume.safetensors"],
        "no temporary file is left beside the checkpoint"
    );
    let state = checkpoint_state(&checkpoints.join("resume.safetensors"))?;
    assert_eq!(state["global_step"], 40, "the second checkpoint survives");
    assert_eq!(state["progress"]["count"], 40 * 500);

    info!("--- resumed from step 40");
    let resumed = train_in_process(
        coordinator::Config {
            resume: Some(run_dir.clone()),
            run_dir: None,
            ..every_20("unused")
        },
        None,
    )
    .await?;
    info!("--- uninterrupted");
    let plain = train_in_process(every_20("plain"), None).await?;
    scenario.teardown();

    assert_eq!(resumed.run_dir, run_dir);
    assert_eq!(resumed.steps, 120);
    assert_eq!(resumed.epochs.len(), 1);
    assert_eq!(resumed.epochs[0].samples, TRAIN_IMAGES);
    assert_eq!(bits(&resumed.parameters), bits(&plain.parameters));
    Ok(())
}
