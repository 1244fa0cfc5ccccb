use crate::{
    Config, Error, Result,
    averaging::{Averaging, ParameterServer},
    local_workers::{LaunchSpec, LocalWorkers, WorkerProgram},
    run_dir::RunDir,
    service::CoordinatorService,
    trainer::{Summary, Trainer},
};
use candle_core::Device;
use common::{
    dataset::Dataset,
    fetch::{default_data_dir, ensure_mnist},
    replica::Replica,
};
use proto::v1::{JobSpec, coordinator_server::CoordinatorServer};
use std::{net::SocketAddr, path::PathBuf, time::Duration};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

/// How long spawned workers get to exit after being told to, before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(10);

/// Runs a whole job on `listener`: loads (or fetches) the data, serves gRPC, spawns local
/// workers unless they are external, trains, and returns the summary. Cancelling `shutdown`
/// stops the job with [`Error::Interrupted`] after telling every worker to leave.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<Summary> {
    config.validate()?;
    let job = config.job();
    let data_dir = config.data_dir.clone().unwrap_or_else(default_data_dir);
    let dataset = load_dataset(data_dir.clone()).await?;
    let dataset_digest = dataset.digest();
    let (train_len, test_len) = (dataset.train.len(), dataset.test.len());
    drop(dataset);
    info!(
        dir = %data_dir.display(),
        train = train_len,
        test = test_len,
        "dataset ready"
    );

    let replica = Replica::new(job.model, &Device::Cpu)?;
    let params = replica.params().clone();
    let initial = params.init_flat(job.seed);
    let started = chrono::Utc::now();
    let job_id = format!("{}-{}", job.model, started.format("%Y%m%d-%H%M%S"));
    let run_dir = config
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&job_id));
    let run_dir = RunDir::create(&run_dir, &job)?;
    info!(run_dir = %run_dir.path().display(), parameters = params.len(), "job {job_id}");

    let spec = JobSpec {
        job_id,
        model: job.model.name().to_string(),
        seed: job.seed,
        parameter_count: params.len() as u64,
        layout_digest: params.layout_digest(),
        dataset_digest,
        config_json: serde_json::to_string(&job).expect("job config serialises"),
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let service = CoordinatorService::new(spec.clone(), data_dir.clone(), events_tx.clone());
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(proto::WINDOW_BYTES)
            .initial_connection_window_size(proto::WINDOW_BYTES)
            .add_service(
                CoordinatorServer::new(service)
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                // Accepted sockets do not get the builder's TCP settings: without NODELAY,
                // Nagle and delayed ACKs add tens of milliseconds to every step.
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                server_stop.clone().cancelled_owned(),
            ),
    );
    info!(%addr, "coordinator listening");

    let local_workers = if config.external_workers {
        None
    } else {
        let spec = LaunchSpec {
            program: config
                .worker_bin
                .clone()
                .map_or(WorkerProgram::CurrentExe, WorkerProgram::Binary),
            coordinator_url: format!("http://{}", loopback_if_unspecified(addr)),
            data_dir,
            threads: config
                .threads_per_worker
                .unwrap_or_else(|| default_threads(config.workers)),
        };
        Some(LocalWorkers::spawn(&spec, config.workers, events_tx)?)
    };

    let averaging = Averaging::ParameterServer(ParameterServer::new(initial, job.optimizer));
    let trainer = Trainer::new(
        job, spec, params, averaging, train_len, test_len, run_dir, events_rx, shutdown,
    );
    let outcome = trainer.run().await;

    if let Some(workers) = local_workers {
        workers.shutdown(WORKER_EXIT_GRACE).await;
    }
    server_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("gRPC server ended with an error: {e}"),
        Ok(Err(e)) => warn!("gRPC server task failed: {e}"),
        Err(_) => warn!("gRPC server did not stop within 5 s"),
    }
    outcome
}

/// Loads the dataset, fetching MNIST first if the directory lacks the files.
async fn load_dataset(dir: PathBuf) -> Result<Dataset> {
    tokio::task::spawn_blocking(move || {
        ensure_mnist(&dir)?;
        Dataset::load(&dir)
    })
    .await
    .expect("dataset loading does not panic")
    .map_err(Error::from)
}

/// Spreads the machine's cores over the local workers.
fn default_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers.max(1)).max(1)
}

fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}
