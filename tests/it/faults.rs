//! Faults injected into real processes while they train: workers killed, stopped, failing or
//! misbehaving, the coordinator killed and resumed, strangers on the port. Every job must still
//! finish with every sample of every epoch trained and the accuracy of the fault-free run.
//!
//! The time from each fault to its detection (and to recovery) is printed, never asserted.

use crate::procs::{
    Cluster, Job, Line, Log, Proc, Procs, WAIT, baseline, epoch_checkpoint, field, free_addr,
    metrics, worker_id,
};
use crate::support::{binary, init_logging, mnist_dir};
use libc::{SIGCONT, SIGKILL, SIGSTOP, SIGTERM};
use proto::v1::{
    ComputeGradient, CoordinatorMessage, Evicted, GradientReport, Heartbeat, Hello,
    RegisterRequest, Shutdown, WorkerMessage, coordinator_client::CoordinatorClient,
    coordinator_message::Kind as Command, worker_message::Kind,
};
use serde_json::Value;
use std::{
    ffi::OsString,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};
use tracing::info;

/// Keeps detection of silent workers short.
const FLAGS: &[&str] = &["--worker-timeout", "2"];

/// How far into the job (470 steps for 4 workers, 2 epochs) faults strike: mid-epoch 1.
const FAULT_STEP: u64 = 150;

/// Allowed distance of the final test accuracy from the fault-free run's.
const ACCURACY_TOLERANCE: f64 = 0.005;

/// Waits for the coordinator's `step done` line of global step `step`.
pub(crate) fn wait_step(log: &Log, step: u64) -> Line {
    let suffix = format!(" global_step={step}");
    log.wait_for_line(
        0,
        &format!("step done ...{suffix}"),
        |line| line.contains("step done") && line.ends_with(&suffix),
        WAIT,
    )
}

pub(crate) fn seconds(what: &str, from: Instant, to: Instant) {
    println!(
        "{what}: {:.2} s",
        to.saturating_duration_since(from).as_secs_f64()
    );
}

/// What every fault test promises: the coordinator exits 0, every epoch trained all 60000
/// samples and evaluated all 10000, and the accuracy is that of the fault-free run.
pub(crate) fn check_job(
    procs: &mut Procs,
    coordinator: &Proc,
    run_dir: &Path,
    job: &Job,
) -> Vec<Value> {
    let status = procs.wait_exit(coordinator, WAIT);
    let exited = Instant::now();
    assert!(
        status.success(),
        "coordinator: {status}\n{}",
        coordinator.log.tail(40)
    );
    let last_epoch = format!("epoch {0}/{0}:", job.epochs);
    if let Some(line) = coordinator.log.find_all(|l| l.contains(&last_epoch)).last() {
        seconds("coordinator exit after the last epoch", line.at, exited);
    }
    let records = metrics(run_dir);
    assert_eq!(records.len(), job.epochs as usize, "{records:?}");
    for record in &records {
        assert_eq!(record["samples"], 60_000, "{record}");
        assert_eq!(record["test_samples"], 10_000, "{record}");
    }
    let accuracy = records.last().unwrap()["test_accuracy"]
        .as_f64()
        .expect("a number");
    let expected = baseline(job).test_accuracy;
    println!("final test accuracy {accuracy:.4} (fault-free {expected:.4})");
    assert!(
        (accuracy - expected).abs() <= ACCURACY_TOLERANCE,
        "test accuracy {accuracy}, fault-free run {expected}"
    );
    records
}

/// The entries of `key` (`workers_lost`, `workers_joined`) of all epochs.
fn entries(records: &[Value], key: &str) -> Vec<Value> {
    records
        .iter()
        .flat_map(|r| r[key].as_array().cloned().expect("a list"))
        .collect()
}

/// Asserts that exactly the workers `ids` were lost, and prints why.
pub(crate) fn assert_lost(records: &[Value], ids: &[&str]) -> Vec<Value> {
    let lost = entries(records, "workers_lost");
    let mut names: Vec<_> = lost.iter().map(|e| e["worker"].as_str().unwrap()).collect();
    names.sort_unstable();
    let mut expected = ids.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected, "workers_lost: {lost:?}");
    for entry in &lost {
        println!(
            "lost {} at step {}: {}",
            entry["worker"], entry["step"], entry["reason"]
        );
    }
    let requeued: u64 = records
        .iter()
        .map(|r| r["samples_requeued"].as_u64().unwrap())
        .sum();
    println!("samples requeued: {requeued}");
    lost
}

/// Whether the two files hold the same bytes.
pub(crate) fn same_bytes(a: &Path, b: &Path) -> bool {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    read(a) == read(b)
}

/// The coordinator's `admitted at step` line for worker `id`, at or after line `from`.
pub(crate) fn wait_admitted(log: &Log, from: usize, id: &str) -> Line {
    log.wait_for_line(
        from,
        &format!("admitted at step ... worker={id}"),
        |line| line.contains("admitted at step") && field(line, "worker") == Some(id),
        WAIT,
    )
}

/// Asserts that worker `id` is among the epochs' `workers_joined`.
pub(crate) fn assert_joined(records: &[Value], id: &str) {
    let joined = entries(records, "workers_joined");
    assert!(joined.iter().any(|j| j["worker"] == id), "{joined:?}");
}

/// The coordinator's `lost at step` line for worker `id`.
pub(crate) fn lost_line(log: &Log, id: &str) -> Line {
    log.wait_for(&format!("worker {id} lost at step"))
}

/// The usual set-up: the fault-free baseline known, then a cluster of 4 workers training the
/// MLP for 2 epochs under `FLAGS`.
fn start(dir: &Path) -> (Job, Procs, Cluster) {
    init_logging();
    let job = Job::mlp(4, 2);
    baseline(&job);
    let mut procs = Procs::new();
    let cluster = procs.cluster(&job, &dir.join("run"), FLAGS, &[]);
    (job, procs, cluster)
}

/// Sends `signal` to `victim` once step `FAULT_STEP` is done, waits until the coordinator
/// reports the worker lost, and prints how long that took. Returns when the signal went out
/// and the coordinator's line.
fn strike(procs: &mut Procs, cluster: &Cluster, victim: &Proc, signal: i32) -> (Instant, Line) {
    let log = &cluster.coordinator.log;
    let id = cluster.worker_id(victim);
    info!("--- signal {signal} to {id} after step {FAULT_STEP}");
    wait_step(log, FAULT_STEP);
    let sent = procs.signal(victim, signal);
    let lost = lost_line(log, &id);
    seconds("detection", sent, lost.at);
    (sent, lost)
}

#[test]
fn worker_sigkilled_mid_epoch_is_evicted_and_its_samples_retrained() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, mut procs, cluster) = start(dir.path());
    let victim = cluster.workers[1].clone();
    let id = cluster.worker_id(&victim);
    let (killed, lost) = strike(&mut procs, &cluster, &victim, SIGKILL);
    let next = cluster.coordinator.log.wait_for_after(&lost, "step done");
    seconds("recovery (next step done)", killed, next.at);

    info!("--- the job finishes");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    let lost = assert_lost(&records, &[&id]);
    assert!(
        lost[0]["reason"].as_str().unwrap().contains("session"),
        "{lost:?}"
    );
    Ok(())
}

#[test]
fn worker_sigtermed_mid_epoch_leaves_cleanly_and_the_job_finishes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, mut procs, cluster) = start(dir.path());
    let victim = cluster.workers[2].clone();
    let id = cluster.worker_id(&victim);
    let (signalled, lost) = strike(&mut procs, &cluster, &victim, SIGTERM);
    let next = cluster.coordinator.log.wait_for_after(&lost, "step done");
    seconds("recovery (next step done)", signalled, next.at);
    let status = procs.wait_exit(&victim, WAIT);
    // It leaves cleanly, and says by its status that it did not finish the job (a
    // Kubernetes Job recreates such a pod rather than counting its part done).
    assert_eq!(status.code(), Some(143), "{status}");
    victim.log.wait_for("shutting down");

    info!("--- the job finishes");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&id]);
    Ok(())
}

#[test]
fn worker_exiting_with_failure_status_is_evicted_and_the_job_finishes() -> anyhow::Result<()> {
    init_logging();
    let job = Job::mlp(4, 2);
    baseline(&job);
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let mut procs = Procs::new();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let coordinator = procs.external_coordinator("coordinator", &job, addr, &run_dir, FLAGS);
    for i in 0..3 {
        procs.worker(&format!("worker#{i}"), &url, &[]);
    }
    let failing = procs.worker("worker#3 (fails)", &url, &["--fail-after-steps", "100"]);
    let id = worker_id(&coordinator.log, 0, failing.pid);

    info!("--- {id} exits with status 1 after its 100th gradient");
    let failed = failing.log.wait_for("ERROR");
    let status = procs.wait_exit(&failing, WAIT);
    assert_eq!(status.code(), Some(1), "{}", failing.log.tail(10));
    let lost = lost_line(&coordinator.log, &id);
    let next = coordinator.log.wait_for_after(&lost, "step done");
    seconds(
        "detection (from the worker's error line)",
        failed.at,
        lost.at,
    );
    seconds("recovery (next step done)", failed.at, next.at);

    info!("--- the job finishes");
    let records = check_job(&mut procs, &coordinator, &run_dir, &job);
    assert_lost(&records, &[&id]);
    Ok(())
}

#[test]
fn stopped_worker_is_evicted_as_silent_and_rejoins_when_continued() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, mut procs, cluster) = start(dir.path());
    let log = &cluster.coordinator.log;
    let victim = cluster.workers[0].clone();
    let id = cluster.worker_id(&victim);
    let (stopped, lost) = strike(&mut procs, &cluster, &victim, SIGSTOP);
    let next = log.wait_for_after(&lost, "step done");
    seconds("recovery (next step done)", stopped, next.at);

    info!("--- SIGCONT: the same process registers again and is admitted");
    let continued = procs.signal(&victim, SIGCONT);
    let admitted = log.wait_for_after(&lost, "admitted at step");
    seconds("rejoin after SIGCONT", continued, admitted.at);
    let new_id = field(&admitted.text, "worker")
        .expect("worker field")
        .to_owned();
    assert_eq!(
        new_id,
        worker_id(log, lost.index, victim.pid),
        "the continued process is the one admitted: {}",
        admitted.text
    );
    // The worker reads why its session ended, even when it finds the session closed while
    // sending the answer it was computing when stopped.
    let again = victim.log.wait_for("registering again");
    assert!(
        again.text.contains("evicted by the coordinator"),
        "{}",
        again.text
    );
    assert!(procs.is_running(&victim));

    info!("--- the job finishes");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    let lost = assert_lost(&records, &[&id]);
    let reason = lost[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("silent") || reason.contains("straggler"),
        "{reason}"
    );
    assert_joined(&records, &new_id);
    Ok(())
}

#[test]
fn two_workers_sigkilled_in_the_same_step_leave_two_to_finish() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, mut procs, cluster) = start(dir.path());
    let log = &cluster.coordinator.log;
    let victims = [cluster.workers[1].clone(), cluster.workers[3].clone()];
    let ids = victims.clone().map(|v| cluster.worker_id(&v));

    info!("--- SIGKILL {ids:?} after step {FAULT_STEP}");
    wait_step(log, FAULT_STEP);
    let killed = victims.clone().map(|v| procs.signal(&v, SIGKILL));
    let lost = ids.clone().map(|id| lost_line(log, &id));
    let last = lost.iter().max_by_key(|l| l.index).unwrap();
    let next = log.wait_for_after(last, "step done");
    for (id, (killed, lost)) in ids.iter().zip(killed.iter().zip(&lost)) {
        seconds(&format!("detection of {id}"), *killed, lost.at);
    }
    seconds("recovery (next step done)", killed[0], next.at);

    info!("--- the job finishes with 2 workers");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&ids[0], &ids[1]]);
    assert_eq!(records.last().unwrap()["workers"], 2);
    Ok(())
}

#[test]
fn killed_worker_replaced_by_a_new_process_joins_at_a_step_boundary() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, mut procs, cluster) = start(dir.path());
    let log = &cluster.coordinator.log;
    let victim = cluster.workers[1].clone();
    let id = cluster.worker_id(&victim);
    let (killed, lost) = strike(&mut procs, &cluster, &victim, SIGKILL);

    info!("--- a new worker process takes its place");
    let started = Instant::now();
    let replacement = procs.worker("worker#1 (restarted)", &cluster.url, &[]);
    let new_id = cluster.worker_id(&replacement);
    let admitted = wait_admitted(log, lost.index, &new_id);
    seconds("restart to admission", started, admitted.at);
    seconds("fault to full strength", killed, admitted.at);

    info!("--- the job finishes with 4 workers");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&id]);
    assert_joined(&records, &new_id);
    assert_eq!(records.last().unwrap()["workers"], 4);
    Ok(())
}

/// SIGKILL of the coordinator mid-epoch, then `--resume`: the same worker processes reconnect,
/// and since no step is lost, the parameters equal those of the uninterrupted run, bit for bit.
#[test]
fn coordinator_sigkilled_and_resumed_ends_with_the_parameters_of_an_uninterrupted_run()
-> anyhow::Result<()> {
    // 2 workers: 469 steps per epoch.
    coordinator_sigkilled_and_resumed(Job::mlp(2, 2))
}

/// Kills the coordinator of `job` mid-epoch, resumes it, and checks that the workers carried
/// on and the final parameters are those of an uninterrupted run.
pub(crate) fn coordinator_sigkilled_and_resumed(job: Job) -> anyhow::Result<()> {
    init_logging();
    let fault_free = baseline(&job);
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let resume_flags = [
        "--worker-timeout",
        "2",
        "--checkpoint-every",
        "50",
        "--resume",
        run_dir.to_str().expect("UTF-8 path"),
    ];
    let mut procs = Procs::new();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let first = procs.external_coordinator("coordinator", &job, addr, &run_dir, &resume_flags[..4]);
    let workers: Vec<Proc> = (0..job.workers)
        .map(|i| procs.worker(&format!("worker#{i}"), &url, &[]))
        .collect();

    info!("--- SIGKILL the coordinator after step 130 (checkpoint at 100)");
    first
        .log
        .wait_for("resume checkpoint written global_step=100");
    wait_step(&first.log, 130);
    let killed = procs.signal(&first, SIGKILL);
    let status = procs.wait_exit(&first, WAIT);
    assert_eq!(status.code(), None, "killed by a signal: {status}");

    info!("--- restart with --resume on the same address");
    let second =
        procs.external_coordinator("coordinator (resumed)", &job, addr, &run_dir, &resume_flags);
    let resumed = second.log.wait_for("training resumes");
    seconds("coordinator kill to training resumed", killed, resumed.at);
    println!(
        "{}",
        &resumed.text[resumed.text.find("training").unwrap()..]
    );
    assert!(
        resumed.text.contains("at epoch 1, step 100"),
        "{}",
        resumed.text
    );
    for worker in &workers {
        let first_registration = worker.log.wait_for("registered worker=");
        let again = worker
            .log
            .wait_for_after(&first_registration, "registered worker=");
        seconds(
            &format!("{} registered again", worker.name),
            killed,
            again.at,
        );
        assert!(
            procs.is_running(worker),
            "{} was not restarted",
            worker.name
        );
        worker_id(&second.log, 0, worker.pid);
    }

    info!("--- the job finishes");
    let records = check_job(&mut procs, &second, &run_dir, &job);
    assert_lost(&records, &[]);
    for worker in &workers {
        let status = procs.wait_exit(worker, WAIT);
        assert!(status.success(), "{}: {status}", worker.name);
        assert_eq!(
            worker
                .log
                .find_all(|l| l.contains("registered worker="))
                .len(),
            2,
            "{} registered once per coordinator",
            worker.name
        );
    }
    // Steps done again after the restart are recorded again, not twice.
    let progress = std::fs::read_to_string(run_dir.join("progress.jsonl"))?;
    let steps: Vec<u64> = progress
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).map(|r| r["global_step"].as_u64())
        })
        .collect::<Result<Option<_>, _>>()?
        .expect("every progress record has a global_step");
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "progress.jsonl goes back: {steps:?}"
    );
    let last = job.epochs;
    assert!(
        same_bytes(
            &epoch_checkpoint(&run_dir, last),
            &epoch_checkpoint(&fault_free.run_dir, last)
        ),
        "epoch {last} parameters differ from the uninterrupted run's ({})",
        fault_free.run_dir.display()
    );
    Ok(())
}

/// What a client of the test itself, speaking the protocol with made-up answers, saw.
struct Rogue {
    worker_id: u64,
    first_answer: Option<Instant>,
    evicted: Option<String>,
}

/// What a rogue sends for a request: its gradient, loss sum and correct count.
type Answer = (Vec<f32>, f64, u64);

/// A client that speaks the protocol and answers every request with `poison(parameter count)`
/// as its gradient, until it is dismissed.
async fn rogue_worker(url: String, poison: Poison) -> anyhow::Result<Rogue> {
    rogue_answering(url, move |len, compute| {
        let count = proto::decode_u32("indices", &compute.indices)?.len() as f64;
        Ok((poison(len), 2.3 * count, 0))
    })
    .await
}

/// A client that speaks the protocol and answers every request with what `answer` makes of
/// it (given the parameter count), until it is dismissed.
async fn rogue_answering(
    url: String,
    mut answer: impl FnMut(usize, &ComputeGradient) -> anyhow::Result<Answer>,
) -> anyhow::Result<Rogue> {
    use anyhow::Context;
    let message = |kind| WorkerMessage { kind: Some(kind) };
    let mut client = CoordinatorClient::connect(url)
        .await?
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES);
    let reply = client
        .register(RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            hostname: "rogue".into(),
            pid: std::process::id(),
            device: "cpu".into(),
            dataset_digest: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let parameter_count = reply.job.context("a job spec")?.parameter_count as usize;
    let (outbox, outbound) = tokio::sync::mpsc::channel(8);
    outbox
        .send(message(Kind::Hello(Hello {
            worker_id: reply.worker_id,
            session_secret: reply.session_secret.clone(),
        })))
        .await?;
    let beats = outbox.clone();
    let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(10));
    let heartbeats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if beats
                .send(message(Kind::Heartbeat(Heartbeat {})))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await?
        .into_inner();
    let mut first_answer = None;
    let evicted = loop {
        let Ok(Some(CoordinatorMessage {
            kind: Some(command),
        })) = inbound.message().await
        else {
            break None;
        };
        match command {
            Command::Compute(compute) => {
                let count = proto::decode_u32("indices", &compute.indices)?.len() as u64;
                let (gradient, loss_sum, correct) = answer(parameter_count, &compute)?;
                first_answer.get_or_insert_with(Instant::now);
                outbox
                    .send(message(Kind::Gradient(GradientReport {
                        step: compute.step,
                        count,
                        loss_sum,
                        correct,
                        gradient: proto::encode_f32(&gradient),
                        compute_seconds: 0.001,
                        ..Default::default()
                    })))
                    .await?;
            }
            // Evicted invites it back; Shutdown (for unusable answers) does not.
            Command::Evicted(Evicted { reason }) | Command::Shutdown(Shutdown { reason, .. }) => {
                break Some(reason);
            }
            other => anyhow::bail!("asked for something else: {other:?}"),
        }
    };
    heartbeats.abort();
    Ok(Rogue {
        worker_id: reply.worker_id,
        first_answer,
        evicted,
    })
}

/// A four-worker MLP job with room for a fifth member, and a runtime for the rogue clients
/// that join it.
struct RogueJob {
    job: Job,
    procs: Procs,
    cluster: Cluster,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

fn rogue_job() -> anyhow::Result<RogueJob> {
    init_logging();
    let job = Job::mlp(4, 2);
    baseline(&job);
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let flags = ["--worker-timeout", "2", "--max-workers", "5"];
    let cluster = procs.cluster(&job, &dir.path().join("run"), &flags, &[]);
    Ok(RogueJob {
        job,
        procs,
        cluster,
        runtime: tokio::runtime::Runtime::new()?,
        dir,
    })
}

#[test]
fn rogue_client_sending_nan_gradients_is_evicted_naming_the_value() -> anyhow::Result<()> {
    let RogueJob {
        job,
        mut procs,
        cluster,
        runtime,
        dir: _dir,
    } = rogue_job()?;
    let log = &cluster.coordinator.log;

    info!("--- a rogue client joins after step 100 and answers with NaN");
    wait_step(log, 100);
    let rogue = runtime.spawn(rogue_worker(cluster.url.clone(), nan_at_7));
    let lost = log.wait_for_line(
        0,
        "lost at step ... non-finite",
        |line| line.contains("lost at step") && line.contains("non-finite"),
        WAIT,
    );
    let rogue = runtime.block_on(async { tokio::time::timeout(WAIT, rogue).await })???;
    let id = format!("w{}", rogue.worker_id);
    assert!(
        lost.text.contains(&format!("worker {id} lost")),
        "{}",
        lost.text
    );
    assert!(lost.text.contains("NaN"), "{}", lost.text);
    let first_answer = rogue
        .first_answer
        .expect("the rogue was asked for a gradient");
    seconds("detection", first_answer, lost.at);
    let reason = rogue.evicted.expect("the rogue is told it was evicted");
    println!("the rogue was told: {reason}");
    assert!(reason.contains("non-finite"), "{reason}");

    info!("--- the job finishes");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    let lost = assert_lost(&records, &[&id]);
    assert!(lost[0]["reason"].as_str().unwrap().contains("NaN"));
    assert_joined(&records, &id);
    Ok(())
}

/// Finite garbage: one gradient of `1e30`s, which once averaged left the model at chance for
/// the rest of the job. The screen refuses it before averaging, names it in the log and in
/// `metrics.jsonl`, and the job ends as accurate as a fault-free run.
#[test]
fn a_rogue_gradient_of_finite_garbage_is_refused_before_averaging() -> anyhow::Result<()> {
    let RogueJob {
        job,
        mut procs,
        cluster,
        runtime,
        dir: _dir,
    } = rogue_job()?;
    let log = &cluster.coordinator.log;

    info!("--- a rogue client joins after step 100 and answers with 1e30s");
    wait_step(log, 100);
    let rogue = runtime.spawn(rogue_worker(cluster.url.clone(), |len| vec![1e30; len]));
    let refused = log.wait_for_line(
        0,
        "gradient refused",
        |line| line.contains("gradient refused"),
        WAIT,
    );
    let rogue = runtime.block_on(async { tokio::time::timeout(WAIT, rogue).await })???;
    let id = format!("w{}", rogue.worker_id);
    assert!(refused.text.contains(&id), "{}", refused.text);
    assert!(refused.text.contains("gradient norm"), "{}", refused.text);
    let reason = rogue.evicted.expect("the rogue is told it was evicted");
    println!("the rogue was told: {reason}");
    assert!(reason.contains("gradient refused"), "{reason}");

    info!("--- the job finishes as accurate as a fault-free run");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&id]);
    let refusals = entries(&records, "gradients_refused");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["worker"], id.as_str());
    assert!(refusals[0]["step"].as_u64() >= Some(100), "{refusals:?}");
    for record in &records {
        let spread = record["gradient_spread"]
            .as_f64()
            .expect("four workers: a spread");
        println!(
            "epoch {}: largest honest gradient norm {spread:.2} times the others' median",
            record["epoch"]
        );
        assert!(spread > 0.0, "{record}");
    }
    Ok(())
}

/// A member sending ten times its true gradient with the sign turned, every step, from step
/// 100 of a two-epoch MLP job. Late in training the sustained rule refuses such a member
/// within 14-58 steps (replayed on recorded norms, see `scripts/screen_replay.py`), but this
/// early four steps of it among five members make the model climb the loss until the
/// rogue's norm passes the absolute bound (refused at step 105), and the job ends at 15.7%
/// instead of 97.6%. What would catch it in its first step without refusing honest spikes
/// is not built yet: single honest steps reach 463 times the others' median norm, and their
/// cosine with the others' sum goes down to -0.58 (three-worker MLP, parameter server).
#[test]
#[ignore = "known limitation: a scaled gradient early in training is refused too late"]
fn a_member_sending_minus_ten_times_its_gradient_is_refused_and_the_job_keeps_its_accuracy()
-> anyhow::Result<()> {
    let RogueJob {
        job,
        mut procs,
        cluster,
        runtime,
        dir: _dir,
    } = rogue_job()?;
    let log = &cluster.coordinator.log;
    // The rogue computes as an honest worker would, then turns and scales the gradient.
    let dataset = common::dataset::Dataset::load(&mnist_dir())?;
    let device = candle_core::Device::Cpu;
    let mut replica = common::replica::Replica::new(common::model::ModelKind::Mlp, &device)?;
    let scaled = move |_: usize, compute: &ComputeGradient| -> anyhow::Result<Answer> {
        let parameters = proto::decode_f32("parameters", &compute.parameters)?;
        let indices = proto::decode_u32("indices", &compute.indices)?;
        let (images, labels) = dataset.train.batch(&indices, &device)?;
        let honest = replica.gradient(&parameters, &images, &labels, compute.dropout_seed)?;
        let gradient = honest.gradient.iter().map(|g| -10.0 * g).collect();
        Ok((gradient, honest.loss_sum, honest.correct))
    };

    info!("--- a member joins after step 100 and sends -10 times its gradient");
    wait_step(log, 100);
    let rogue = runtime.spawn(rogue_answering(cluster.url.clone(), scaled));
    let refused = log.wait_for_line(
        0,
        "gradient refused",
        |line| line.contains("gradient refused"),
        WAIT,
    );
    let rogue = runtime.block_on(async { tokio::time::timeout(WAIT, rogue).await })???;
    let id = format!("w{}", rogue.worker_id);
    assert!(refused.text.contains(&id), "{}", refused.text);
    println!("refused: {}", refused.text);
    let first = rogue
        .first_answer
        .expect("the rogue was asked for gradients");
    seconds("first scaled gradient to its refusal", first, refused.at);
    let reason = rogue.evicted.expect("the rogue is told it was evicted");
    println!("the rogue was told: {reason}");

    info!("--- the job finishes as accurate as a fault-free run");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&id]);
    let refusals = entries(&records, "gradients_refused");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let step = refusals[0]["step"].as_u64().expect("a step");
    let joined = entries(&records, "workers_joined");
    let joined_at = joined
        .iter()
        .find(|j| j["worker"] == id.as_str())
        .and_then(|j| j["step"].as_u64())
        .expect("the rogue's join is recorded");
    println!(
        "joined at step {joined_at}, refused at step {step}: {} steps",
        step - joined_at
    );
    Ok(())
}

/// Builds a rogue's gradient from the model's parameter count.
type Poison = fn(usize) -> Vec<f32>;

fn nan_at_7(len: usize) -> Vec<f32> {
    let mut gradient = vec![0.0; len];
    gradient[7] = f32::NAN;
    gradient
}

/// Gradients one float short, and gradients over the 64 MiB message limit: each rogue is
/// evicted with a reason that names the problem, and training goes on unaffected.
#[test]
fn rogue_clients_with_short_or_oversized_gradients_are_evicted() -> anyhow::Result<()> {
    let RogueJob {
        job,
        mut procs,
        cluster,
        runtime,
        dir: _dir,
    } = rogue_job()?;
    let log = &cluster.coordinator.log;
    let cases: [(&str, Poison, &str); 2] = [
        ("one float short", |len| vec![0.0; len - 1], "parameters"),
        (
            "over the message limit",
            |_| vec![0.0; proto::MAX_MESSAGE_BYTES / 4 + 1],
            "session broke",
        ),
    ];
    let mut ids = Vec::new();
    let mut after = wait_step(log, 100);
    for (what, poison, named) in cases {
        info!("--- a rogue client answers with a gradient {what}");
        let rogue = runtime.spawn(rogue_worker(cluster.url.clone(), poison));
        let rogue = runtime.block_on(async { tokio::time::timeout(WAIT, rogue).await })???;
        let id = format!("w{}", rogue.worker_id);
        let lost = log.wait_for_after(&after, &format!("worker {id} lost at step"));
        println!(
            "{what}: {}",
            &lost.text[lost.text.find("lost").unwrap_or(0)..]
        );
        assert!(lost.text.contains(named), "{}", lost.text);
        after = lost;
        ids.push(id);
    }

    info!("--- the job finishes");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[&ids[0], &ids[1]]);
    Ok(())
}

#[test]
fn clients_without_the_join_token_are_unauthenticated_and_training_is_unaffected()
-> anyhow::Result<()> {
    use proto::security::{ClientAuth, JoinToken};
    use tonic::{Code, transport::Endpoint};
    init_logging();
    let job = Job::mlp(4, 2);
    let fault_free = baseline(&job);
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let token = "s3cret-join-token";
    let flags = ["--worker-timeout", "2", "--join-token", token];
    let cluster = procs.cluster(
        &job,
        &dir.path().join("run"),
        &flags,
        &["--join-token", token],
    );
    let log = &cluster.coordinator.log;

    info!("--- clients with a wrong token and with none, after step 100");
    wait_step(log, 100);
    let runtime = tokio::runtime::Runtime::new()?;
    let codes = runtime.block_on(async {
        let channel = Endpoint::from_shared(cluster.url.clone())?
            .connect()
            .await?;
        let request = || RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            hostname: "intruder".into(),
            pid: std::process::id(),
            device: "cpu".into(),
            dataset_digest: String::new(),
            ..Default::default()
        };
        let wrong = ClientAuth::new(Some(JoinToken::new("wrong-token".into())?));
        let mut wrong = CoordinatorClient::with_interceptor(channel.clone(), wrong);
        let mut anonymous = CoordinatorClient::new(channel);
        let hello = WorkerMessage {
            kind: Some(Kind::Hello(Hello {
                worker_id: 1,
                session_secret: String::new(),
            })),
        };
        anyhow::Ok([
            wrong.register(request()).await.map(|_| ()),
            anonymous.register(request()).await.map(|_| ()),
            wrong.session(tokio_stream::iter([hello])).await.map(|_| ()),
        ])
    })?;
    for (what, result) in [
        "register, wrong token",
        "register, no token",
        "session, wrong token",
    ]
    .iter()
    .zip(codes)
    {
        let status = result.expect_err(what);
        println!("{what}: {:?}: {}", status.code(), status.message());
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status}");
    }
    log.wait_for("rejected a request: wrong join token");
    log.wait_for("rejected a request: missing join token");

    info!("--- the job finishes as if nothing happened");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    assert_lost(&records, &[]);
    assert!(same_bytes(
        &epoch_checkpoint(&cluster.run_dir, job.epochs),
        &epoch_checkpoint(&fault_free.run_dir, job.epochs)
    ));
    Ok(())
}

/// Sends `bytes` on a new connection, closes its sending side, and returns what came back
/// before the coordinator closed the connection (or 5 s passed).
fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The server may close before reading everything: errors are part of the test.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn garbage_and_http1_on_the_grpc_port_leave_training_unaffected() -> anyhow::Result<()> {
    init_logging();
    let job = Job::mlp(4, 2);
    let fault_free = baseline(&job);
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let cluster = procs.cluster(&job, &dir.path().join("run"), FLAGS, &[]);
    let log = &cluster.coordinator.log;

    info!("--- garbage connections after step 100");
    wait_step(log, 100);
    // A connection that never says anything, open until the job ends.
    let idle = TcpStream::connect(cluster.addr)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..8 {
        let len = 1 + (random() % 8192) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| random() as u8).collect();
        let answer = exchange(cluster.addr, &bytes);
        println!("{len} random bytes: {} bytes back", answer.len());
    }
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend((0..512).map(|_| random() as u8));
    let answer = exchange(cluster.addr, &preface);
    println!("HTTP/2 preface + garbage: {} bytes back", answer.len());
    let answer = exchange(
        cluster.addr,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    let what = if answer.starts_with(b"HTTP/1") {
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    } else {
        format!(
            "{} bytes, starting {:02x?}",
            answer.len(),
            &answer[..answer.len().min(9)]
        )
    };
    println!("HTTP/1.1 GET answered: {what}");

    info!("--- the job finishes as if nothing happened");
    let records = check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    drop(idle);
    for line in log.find_all(|l| l.contains(" WARN ")) {
        println!("coordinator warned: {}", line.text);
    }
    assert_lost(&records, &[]);
    assert!(same_bytes(
        &epoch_checkpoint(&cluster.run_dir, job.epochs),
        &epoch_checkpoint(&fault_free.run_dir, job.epochs)
    ));
    Ok(())
}

#[test]
fn spawned_worker_sigkilled_is_restarted_by_the_coordinator() -> anyhow::Result<()> {
    init_logging();
    let job = Job::mlp(3, 2);
    baseline(&job);
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let mut procs = Procs::new();
    let mut args: Vec<OsString> = ["--workers", "3", "--threads-per-worker", "1"]
        .iter()
        .chain(FLAGS)
        .map(OsString::from)
        .collect();
    args.extend(job.args().into_iter().map(OsString::from));
    args.extend(["--data-dir".into(), mnist_dir().into_os_string()]);
    args.extend(["--run-dir".into(), run_dir.clone().into_os_string()]);
    let coordinator = procs.coordinator("coordinator", &args);
    let log = &coordinator.log;
    let spawned = log.wait_for("spawned worker process index=1 ");
    let pid: u32 = field(&spawned.text, "pid").expect("pid field").parse()?;
    let id = worker_id(log, 0, pid);

    info!("--- SIGKILL spawned worker 1 ({id}, pid {pid}) after step {FAULT_STEP}");
    wait_step(log, FAULT_STEP);
    let killed = Instant::now();
    // SAFETY: kill has no memory effects; the coordinator has not reaped its child yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, SIGKILL) }, 0);
    let lost = lost_line(log, &id);
    seconds("detection", killed, lost.at);
    let exited = log.wait_for("worker process 1 exited");
    assert!(exited.text.ends_with("restarting it"), "{}", exited.text);
    let respawned = log.wait_for_after(&spawned, "spawned worker process index=1 ");
    let new_pid: u32 = field(&respawned.text, "pid").expect("pid field").parse()?;
    let new_id = worker_id(log, respawned.index, new_pid);
    let admitted = wait_admitted(log, respawned.index, &new_id);
    seconds("fault to full strength", killed, admitted.at);

    info!("--- the job finishes with 3 workers");
    let records = check_job(&mut procs, &coordinator, &run_dir, &job);
    assert_lost(&records, &[&id]);
    assert_joined(&records, &new_id);
    assert_eq!(records.last().unwrap()["workers"], 3);
    Ok(())
}

/// With `--min-workers 2`, losing one of two workers pauses the job; it carries on when a new
/// worker arrives, and the epoch still trains every sample.
#[test]
fn below_min_workers_the_job_pauses_until_a_worker_arrives() -> anyhow::Result<()> {
    init_logging();
    let job = Job::mlp(2, 2);
    baseline(&job);
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let flags = ["--worker-timeout", "2", "--min-workers", "2"];
    let cluster = procs.cluster(&job, &dir.path().join("run"), &flags, &[]);
    let log = &cluster.coordinator.log;
    let victim = cluster.workers[1].clone();
    let (killed, lost) = strike(&mut procs, &cluster, &victim, SIGKILL);
    let paused = log.wait_for_after(&lost, "paused:");
    seconds("fault to pause", killed, paused.at);

    info!("--- paused: no step while one worker is missing");
    std::thread::sleep(Duration::from_secs(1));
    let steps_while_paused = log
        .find_all(|l| l.contains("step done"))
        .iter()
        .filter(|l| l.index > paused.index)
        .count();
    assert_eq!(steps_while_paused, 0, "the job trained while paused");

    info!("--- coordinator status: paused, one worker active, the killed one gone");
    let victim_id = cluster.worker_id(&victim);
    let output = std::process::Command::new(binary("coordinator"))
        .args(["status", "--json", "--coordinator", &cluster.url])
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(status["phase"], "paused", "{status}");
    let workers = status["workers"].as_array().expect("a list of workers");
    let active = workers.iter().filter(|w| w["state"] == "active").count();
    assert_eq!(active, 1, "{status}");
    let gone = workers
        .iter()
        .find(|w| format!("w{}", w["worker_id"]) == victim_id)
        .unwrap_or_else(|| panic!("{victim_id} not listed: {status}"));
    assert_eq!(gone["state"], "left", "{status}");
    assert!(
        gone["reason"]
            .as_str()
            .is_some_and(|r| r.contains("session")),
        "{status}"
    );

    info!("--- a new worker arrives and the job carries on");
    let started = Instant::now();
    procs.worker("worker#1 (new)", &cluster.url, &[]);
    let resumed = log.wait_for_after(&paused, "resumed with 2 workers");
    seconds("arrival to resumed training", started, resumed.at);
    check_job(&mut procs, &cluster.coordinator, &cluster.run_dir, &job);
    Ok(())
}

/// A pause longer than `--pause-timeout` ends the job with an error that says how many
/// workers it had and needed; the remaining worker is dismissed.
#[test]
fn a_pause_past_its_timeout_fails_naming_the_shortfall() -> anyhow::Result<()> {
    init_logging();
    let job = Job::mlp(2, 2);
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let flags = [
        "--worker-timeout",
        "2",
        "--min-workers",
        "2",
        "--pause-timeout",
        "1",
    ];
    let cluster = procs.cluster(&job, &dir.path().join("run"), &flags, &[]);
    let victim = cluster.workers[1].clone();
    strike(&mut procs, &cluster, &victim, SIGKILL);
    let status = procs.wait_exit(&cluster.coordinator, WAIT);
    assert_eq!(
        status.code(),
        Some(75),
        "the job cannot finish without workers, and may be resumed"
    );
    let error = cluster
        .coordinator
        .log
        .wait_for("paused with 1 of the 2 workers needed");
    println!("{}", error.text);
    let survivor = &cluster.workers[0];
    let status = procs.wait_exit(survivor, WAIT);
    assert!(
        status.success(),
        "the remaining worker is dismissed: {status}"
    );
    Ok(())
}
