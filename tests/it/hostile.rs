//! Members and clients that lie: every field a client sends is hostile. A real coordinator
//! over a real socket, in this process, and clients of the test itself that speak the
//! protocol but send what no worker would: identity fields of 60 MiB or with a forged log
//! line, another registration's id, a flood of registrations, loss sums no model can
//! produce, per-class counts that wrap around u64, a failure message of 20 MiB. Each is
//! refused or evicted with a reason naming the field, and the run directory stays readable.

use crate::support::{init_logging, mnist_dir, test_config};
use common::dataset::{CLASSES, Dataset};
use proto::v1::{
    CoordinatorMessage, EvalReport, Failure, GradientReport, Heartbeat, Hello, RegisterRequest,
    StatusRequest, WorkerMessage, WorkerState, coordinator_client::CoordinatorClient,
    coordinator_message::Kind as Command, worker_message::Kind,
};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::{Code, transport::Channel};
use tracing::info;

/// The most any wait here takes.
const WAIT: Duration = Duration::from_secs(120);

fn registration() -> RegisterRequest {
    RegisterRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        hostname: "rogue".into(),
        pid: std::process::id(),
        device: "cpu".into(),
        ..Default::default()
    }
}

fn message(kind: Kind) -> WorkerMessage {
    WorkerMessage { kind: Some(kind) }
}

fn hello(worker_id: u64, session_secret: &str) -> WorkerMessage {
    message(Kind::Hello(Hello {
        worker_id,
        session_secret: session_secret.into(),
    }))
}

async fn connect(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match CoordinatorClient::connect(url.to_string()).await {
            Ok(client) => {
                return Ok(client
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES));
            }
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Registrations that no worker sends are refused by field, another's id cannot be taken, and
/// registrations that never open a session cannot pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_registrations_are_refused_by_field_and_bounded() -> anyhow::Result<()> {
    init_logging();
    let runs = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = process::Stop::default();
    // Two workers to wait for: the one session opened here never starts the job.
    let job = tokio::spawn(coordinator::run(
        coordinator::Config {
            workers: 2,
            ..test_config(runs.path())
        },
        listener,
        stop.clone(),
    ));
    let mut client = connect(&url).await?;

    info!("--- a 60 MiB host name, and one with a forged log line");
    for (request, named) in [
        (
            RegisterRequest {
                hostname: "h".repeat(60 << 20),
                ..registration()
            },
            "hostname is 62914560 bytes long; at most 255",
        ),
        (
            RegisterRequest {
                hostname: "node\n2026-01-01T00:00:00Z  INFO coordinator: training complete".into(),
                ..registration()
            },
            "hostname holds the control character",
        ),
        (
            RegisterRequest {
                ring_host: "r".repeat(40 << 20),
                ring_port: 9000,
                ..registration()
            },
            "ring_host is 41943040 bytes long",
        ),
        (
            RegisterRequest {
                dataset_digest: "é".repeat(12),
                ..registration()
            },
            "dataset_digest must be empty or 64",
        ),
    ] {
        let refused = client.register(request).await.unwrap_err();
        println!("{:?}: {}", refused.code(), refused.message());
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains(named), "{}", refused.message());
    }

    info!("--- another client takes the next id before its owner opens the session");
    // The owner's session then opens and the owner is a member, waiting with the job for a
    // second one.
    let owner = client.register(registration()).await?.into_inner();
    let mut thief = connect(&url).await?;
    for guess in [String::new(), "0".repeat(32)] {
        let refused = thief
            .session(tokio_stream::iter([hello(owner.worker_id, &guess)]))
            .await
            .unwrap_err();
        println!("{:?}: {}", refused.code(), refused.message());
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(
            refused.message().contains("secret"),
            "{}",
            refused.message()
        );
    }
    let (outbox, outbound) = tokio::sync::mpsc::channel(4);
    outbox
        .send(hello(owner.worker_id, &owner.session_secret))
        .await?;
    let _session = client
        .session(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = client.status(StatusRequest {}).await?.into_inner();
        if status
            .workers
            .iter()
            .any(|w| w.worker_id == owner.worker_id && w.state() == WorkerState::Active)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    info!("--- registrations that never open a session are capped");
    let mut accepted = 0;
    let refused = loop {
        match client.register(registration()).await {
            Ok(_) => accepted += 1,
            Err(status) => break status,
        }
        assert!(
            accepted <= 256,
            "more than 256 pending registrations accepted"
        );
    };
    println!(
        "after {accepted} more: {:?}: {}",
        refused.code(),
        refused.message()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("256 registrations"),
        "{}",
        refused.message()
    );

    stop.request(process::StopCause::Interrupt);
    let outcome = job.await?;
    assert!(matches!(
        outcome,
        Err(coordinator::Error::Stopped(process::StopCause::Interrupt))
    ));
    Ok(())
}

/// What a rogue member does with the requests it gets.
#[derive(Debug, Clone, Copy)]
enum Mischief {
    /// Answers a gradient request with a finite loss sum no model can produce.
    HugeLoss,
    /// Answers a gradient request with a 20 MiB failure message holding forged log lines.
    HugeFailure,
    /// Trains plausibly, then claims its whole test range correct, with per-class counts that
    /// wrap around u64 to the right total.
    WrappedClassCounts,
}

/// A member of the test itself. Returns its id and why it was told to leave.
async fn rogue(url: String, mischief: Mischief) -> anyhow::Result<(u64, String)> {
    let mut client = connect(&url).await?;
    let reply = client.register(registration()).await?.into_inner();
    let parameters = reply.job.as_ref().map_or(0, |j| j.parameter_count) as usize;
    let (outbox, outbound) = tokio::sync::mpsc::channel(8);
    outbox
        .send(hello(reply.worker_id, &reply.session_secret))
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
    let reason = loop {
        let Some(CoordinatorMessage {
            kind: Some(command),
        }) = inbound.message().await?
        else {
            anyhow::bail!("the session ended without a word");
        };
        let answer = match (command, mischief) {
            (Command::Compute(_), Mischief::HugeFailure) => {
                let forged = "\n\u{1b}[2K2026-01-01T00:00:00Z  INFO coordinator: training complete";
                Kind::Failure(Failure {
                    message: forged.repeat((20 << 20) / forged.len()),
                })
            }
            (Command::Compute(compute), _) => {
                let count = proto::decode_u32("indices", &compute.indices)?.len() as u64;
                let loss_sum = match mischief {
                    Mischief::HugeLoss => 1.7e308,
                    _ => 2.3 * count as f64,
                };
                Kind::Gradient(GradientReport {
                    step: compute.step,
                    count,
                    loss_sum,
                    correct: 0,
                    gradient: proto::encode_f32(&vec![0.0; parameters]),
                    compute_seconds: 0.001,
                    ..Default::default()
                })
            }
            (Command::Evaluate(evaluate), _) => {
                let count = evaluate.end - evaluate.start;
                let mut classes = vec![0u64; CLASSES];
                classes[0] = u64::MAX;
                classes[1] = count + 1;
                Kind::Eval(EvalReport {
                    epoch: evaluate.epoch,
                    count,
                    loss_sum: 0.0,
                    correct: count,
                    start: evaluate.start,
                    end: evaluate.end,
                    class_count: classes.clone(),
                    class_correct: classes,
                })
            }
            (Command::Evicted(e), _) => break e.reason,
            (Command::Shutdown(s), _) => break s.reason,
            (other, _) => anyhow::bail!("asked for something else: {other:?}"),
        };
        outbox.send(message(answer)).await?;
    };
    heartbeats.abort();
    Ok((reply.worker_id, reason))
}

/// The global step and the state and reason of `worker`, as `Status` shows them.
async fn worker_status(
    client: &mut CoordinatorClient<Channel>,
    worker: u64,
) -> anyhow::Result<(u64, Option<(WorkerState, String)>)> {
    let status = client.status(StatusRequest {}).await?.into_inner();
    let shown = status
        .workers
        .iter()
        .find(|w| w.worker_id == worker)
        .map(|w| (w.state(), w.reason.clone()));
    Ok((status.global_step, shown))
}

/// Members that report impossible sums are evicted naming the field, their eviction stays
/// visible in `Status` after their session closes, and nothing they sent reaches the run
/// directory: every number in it is finite, the per-class counts are the test set's, and the
/// failure message is one escaped line of about 1 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reporting_impossible_sums_are_evicted_and_the_run_directory_stays_readable()
-> anyhow::Result<()> {
    init_logging();
    let runs = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = process::Stop::default();
    let job = tokio::spawn(coordinator::run(
        coordinator::Config {
            workers: 1,
            max_workers: Some(8),
            epochs: 1,
            max_steps: Some(300),
            checkpoint_every: 20,
            worker_timeout: 10.0,
            ..test_config(runs.path())
        },
        listener,
        stop.clone(),
    ));
    let honest = tokio::spawn(worker::run(
        worker::Config {
            data_dir: Some(mnist_dir()),
            ..worker::Config::new(url.clone())
        },
        stop.token().child_token(),
    ));
    let mut watcher = connect(&url).await?;
    // The honest worker first, so that the job starts with it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while watcher
        .status(StatusRequest {})
        .await?
        .into_inner()
        .global_step
        < 5
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    info!("--- rogue members join: a huge loss sum, a huge failure, wrapped per-class counts");
    let mut rogues: Vec<_> = [
        Mischief::HugeLoss,
        Mischief::HugeFailure,
        Mischief::WrappedClassCounts,
    ]
    .into_iter()
    .map(|mischief| tokio::spawn(rogue(url.clone(), mischief)))
    .collect();
    let mut told = vec![tokio::time::timeout(WAIT, rogues.remove(0)).await???];

    info!("--- Status still shows the first rogue evicted, for its reason, after it closed");
    let huge_loss = told[0].0;
    // The snapshot is published at the next step boundary.
    let deadline = tokio::time::Instant::now() + WAIT;
    let step = loop {
        let (now, shown) = worker_status(&mut watcher, huge_loss).await?;
        if shown.is_some_and(|(state, _)| state == WorkerState::Evicted) {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never shown evicted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        let (now, shown) = worker_status(&mut watcher, huge_loss).await?;
        let (state, reason) = shown.expect("the evicted rogue is listed");
        assert_eq!(state, WorkerState::Evicted, "{reason}");
        assert!(reason.contains("loss sum 1.7e308"), "{reason}");
        // Its session's end is queued behind a few steps' answers at most.
        if now >= step + 10 || now >= 290 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for rogue in rogues {
        told.push(tokio::time::timeout(WAIT, rogue).await???);
    }
    for ((id, reason), named) in told.iter().zip([
        "loss sum 1.7e308 over",
        "it failed: \\u{a}\\u{1b}[2K2026",
        "per-class image counts",
    ]) {
        println!(
            "w{id} was told: {}",
            reason.chars().take(300).collect::<String>()
        );
        assert!(reason.contains(named), "w{id}: {reason}");
    }

    info!("--- the job finishes with the honest worker");
    let summary = tokio::time::timeout(WAIT * 5, job).await???;
    honest.await??;
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl"))?;
    let summary_json = std::fs::read_to_string(summary.run_dir.join("summary.json"))?;
    for (name, text) in [("metrics.jsonl", &metrics), ("summary.json", &summary_json)] {
        assert!(!text.contains("null"), "{name} holds a null: {text}");
    }
    let record: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap())?;
    let test = Dataset::load(&mnist_dir())?.test;
    let mut truth = vec![0u64; CLASSES];
    for &label in test.labels() {
        truth[usize::from(label)] += 1;
    }
    let per_class: Vec<u64> = serde_json::from_value(record["test_samples_per_class"].clone())?;
    assert_eq!(per_class, truth);
    assert_eq!(record["test_samples"], 10_000);
    let reasons: Vec<String> = record["workers_lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    let failure = reasons
        .iter()
        .find(|r| r.contains("it failed"))
        .expect("the failure is recorded");
    println!("the failure as recorded: {} bytes", failure.len());
    assert!(failure.len() < 1200, "{} bytes", failure.len());
    assert!(!failure.contains('\n') && !failure.contains('\u{1b}'));
    Ok(())
}
