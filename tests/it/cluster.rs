//! Whole jobs with in-process workers over real gRPC, and the coordinator's answers to
//! clients that are not our worker.

use crate::support::{init_logging, mnist_dir, test_config, train_in_process};
use common::model::ModelKind;
use proto::v1::{
    RegisterRequest, WorkerMessage, coordinator_client::CoordinatorClient, worker_message::Kind,
};
use tokio::net::TcpListener;
use tracing::info;

fn l2(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}

/// N workers with batch b must follow 1 worker with batch N*b: the same global batches, and
/// gradients averaged by sample count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_match_one_worker_with_four_times_the_batch() -> anyhow::Result<()> {
    init_logging();
    let runs = tempfile::tempdir()?;
    let job = |workers: usize, batch_size: usize, name: &str| coordinator::Config {
        workers,
        batch_size,
        model: ModelKind::Mlp,
        max_steps: Some(8),
        warmup_steps: 2,
        ..test_config(&runs.path().join(name))
    };

    info!("--- four workers, batch 16");
    let four = train_in_process(job(4, 16, "four"), None).await?;
    info!("--- one worker, batch 64");
    let one = train_in_process(job(1, 64, "one"), None).await?;

    assert_eq!(four.steps, 8);
    assert_eq!(one.steps, 8);
    let initial = {
        let replica = common::replica::Replica::new(ModelKind::Mlp, &candle_core::Device::Cpu)?;
        replica.params().init_flat(42)
    };
    let diff = l2(four
        .parameters
        .iter()
        .zip(&one.parameters)
        .map(|(a, b)| f64::from(a - b)));
    let relative = diff / l2(one.parameters.iter().map(|&v| f64::from(v)));
    let moved = l2(one
        .parameters
        .iter()
        .zip(&initial)
        .map(|(a, b)| f64::from(a - b)));
    let relative_to_update = diff / moved;
    println!(
        "relative difference of parameters {relative:.3e}; of the updates {relative_to_update:.3e}"
    );
    assert!(
        moved > 1e-2,
        "training must move the parameters (moved {moved})"
    );
    assert!(relative <= 1e-5, "relative difference {relative:e}");
    assert!(
        relative_to_update <= 1e-3,
        "updates differ by {relative_to_update:e}"
    );
    Ok(())
}

/// The same seed and world size give bit-identical parameters, dropout included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_world_size_gives_identical_parameters() -> anyhow::Result<()> {
    init_logging();
    let runs = tempfile::tempdir()?;
    let job = |name: &str, seed: u64| coordinator::Config {
        workers: 2,
        batch_size: 32,
        model: ModelKind::MlpDropout,
        max_steps: Some(6),
        seed,
        ..test_config(&runs.path().join(name))
    };
    let first = train_in_process(job("first", 7), None).await?;
    let second = train_in_process(job("second", 7), None).await?;
    let other_seed = train_in_process(job("other", 8), None).await?;
    let bits = |p: &[f32]| p.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first.parameters), bits(&second.parameters));
    assert_ne!(bits(&first.parameters), bits(&other_seed.parameters));
    Ok(())
}

/// A worker with an empty data directory receives the coordinator's dataset over gRPC,
/// verifies it, and trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_without_data_receives_the_dataset() -> anyhow::Result<()> {
    init_logging();
    let runs = tempfile::tempdir()?;
    let empty = tempfile::tempdir()?;
    let config = coordinator::Config {
        workers: 1,
        max_steps: Some(2),
        ..test_config(runs.path())
    };
    let summary = train_in_process(config, Some(empty.path().to_path_buf())).await?;
    assert_eq!(summary.steps, 2);
    let received = common::dataset::Dataset::load(empty.path())?;
    let original = common::dataset::Dataset::load(&mnist_dir())?;
    assert_eq!(received.digest(), original.digest());
    Ok(())
}

/// Clients other than our worker: a wrong protocol version, a different dataset and a
/// session without `hello` are refused with messages that say what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refuses_mismatches_with_reasons() -> anyhow::Result<()> {
    init_logging();
    let runs = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = process::Stop::default();
    let job = tokio::spawn(coordinator::run(
        coordinator::Config {
            workers: 1,
            ..test_config(runs.path())
        },
        listener,
        stop.clone(),
    ));
    let mut client = loop {
        match CoordinatorClient::connect(url.clone()).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let request = |version: u32, digest: &str| RegisterRequest {
        protocol_version: version,
        hostname: "test".into(),
        pid: 1,
        device: "cpu".into(),
        dataset_digest: digest.into(),
        ..Default::default()
    };

    info!("--- protocol version");
    let refused = client.register(request(999, "")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("999"), "{}", refused.message());

    info!("--- dataset");
    let refused = client
        .register(request(proto::PROTOCOL_VERSION, &"00".repeat(32)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("dataset"),
        "{}",
        refused.message()
    );

    info!("--- a dataset digest that is no digest");
    let refused = client
        .register(request(proto::PROTOCOL_VERSION, "00ff"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("dataset_digest"),
        "{}",
        refused.message()
    );

    info!("--- session without hello");
    let not_hello = WorkerMessage {
        kind: Some(Kind::Failure(proto::v1::Failure {
            message: "hi".into(),
        })),
    };
    let refused = client
        .session(tokio_stream::iter([not_hello]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    info!("--- session of an unregistered worker");
    let hello = WorkerMessage {
        kind: Some(Kind::Hello(proto::v1::Hello {
            worker_id: 12345,
            session_secret: String::new(),
        })),
    };
    let refused = client
        .session(tokio_stream::iter([hello]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    stop.request(process::StopCause::Interrupt);
    let outcome = job.await?;
    assert!(matches!(
        outcome,
        Err(coordinator::Error::Stopped(process::StopCause::Interrupt))
    ));
    Ok(())
}

/// A learning rate that blows the model up makes every worker's gradient non-finite in the
/// same step: that is divergence, which stops the job with a named error rather than evicting
/// every worker in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_stops_the_job_with_a_named_error() -> anyhow::Result<()> {
    init_logging();
    let run_dir = tempfile::tempdir()?;
    let config = coordinator::Config {
        workers: 2,
        model: ModelKind::Mlp,
        lr: Some(1e30),
        warmup_steps: 0,
        max_steps: Some(50),
        ..test_config(run_dir.path())
    };
    let error = train_in_process(config, None)
        .await
        .expect_err("a rate of 1e30 diverges");
    let message = format!("{error:#}");
    assert!(message.contains("diverged"), "{message}");
    Ok(())
}
