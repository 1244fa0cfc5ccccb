use crate::{
    Config, Error, Result,
    averaging::{Averaging, ParameterServer},
    config::AllreduceKind,
    console,
    local_workers::{LaunchSpec, LocalWorkers, WorkerProgram},
    plots, prometheus,
    resume::{self, Resume, ResumeState},
    run_dir::RunDir,
    service::CoordinatorService,
    status::{JobStatus, StatusBoard},
    trainer::{Summary, Trainer, TrainerOptions, Transport},
};
use candle_core::Device;
use common::{
    dataset::Dataset,
    fetch::{default_data_dir, ensure_mnist},
    replica::Replica,
};
use process::{Stop, StopCause};
use proto::{
    health::{HealthPort, Liveness, Readiness},
    security::ServerAuth,
    v1::{JobSpec, coordinator_server::CoordinatorServer},
};
use std::{net::SocketAddr, path::PathBuf, time::Duration};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::server::TcpIncoming};
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

/// How long open connections get to close when the job is over.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(1);

/// How long spawned workers get to exit after being told to, before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(10);

/// Runs a whole job on `listener`: loads (or fetches) the data, serves gRPC (with the
/// standard health service, SERVING while the job runs), spawns local workers unless they
/// are external, trains, and returns the summary.
///
/// Asking `stop` stops the job at the next step boundary with [`Error::Stopped`], after
/// writing the resume checkpoint. On Ctrl-C ([`StopCause::Interrupt`]) every worker is told
/// to leave: the job is over. On SIGTERM ([`StopCause::Terminate`]) external workers are left
/// waiting for the coordinator that carries the job on (a restarted Kubernetes pod); spawned
/// workers, which no other coordinator would reach, are stopped.
pub async fn run(config: Config, listener: TcpListener, stop: Stop) -> Result<Summary> {
    config.validate()?;
    // Security settings are read first: a bad file should stop the job before it creates
    // anything.
    let tls = match config.tls() {
        Some(tls) => Some(tls.load().map_err(|e| Error::Config(e.to_string()))?),
        None => None,
    };
    let token = config.join_token()?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("--metrics-listen {addr}"), e))?,
        ),
        None => None,
    };
    let health_listener = match config.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("--health-listen {addr}"), e))?,
        ),
        None => None,
    };
    let resume_dir = resume_dir(&config)?;
    let resume = match &resume_dir {
        Some(dir) => Some(Resume::load(
            &dir.join("checkpoints").join(resume::FILE_NAME),
        )?),
        None => None,
    };
    // A resumed job keeps its own settings; only the cluster's come from the flags. A run
    // directory found holding a checkpoint must hold this very job.
    let job = match &resume {
        Some(r) if config.resume.is_none() && r.state.job != config.job() => {
            return Err(Error::Config(format!(
                "--run-dir {} holds a job with other settings ({}); continue it with --resume, \
                 or give another --run-dir",
                resume_dir.as_ref().expect("found").display(),
                r.state.job.differences(&config.job()).join(", ")
            )));
        }
        Some(r) => {
            info!(
                dir = %resume_dir.as_ref().expect("resuming").display(),
                step = r.state.global_step,
                "carrying the job on from its resume checkpoint"
            );
            r.state.job.clone()
        }
        None => config.job(),
    };
    let data_dir = config.data_dir.clone().unwrap_or_else(default_data_dir);
    let dataset = load_dataset(data_dir.clone()).await?;
    let dataset_digest = dataset.digest();
    let plots_data_dir = data_dir.clone();
    let (train_len, test_len) = (dataset.train.len(), dataset.test.len());
    // What workers' evaluations are checked against: each range's images per class.
    let test_labels = dataset.test.labels().to_vec();
    drop(dataset);
    info!(
        dir = %data_dir.display(),
        train = train_len,
        test = test_len,
        "dataset ready"
    );

    let replica = Replica::new(job.model, &Device::Cpu)?;
    let params = replica.params().clone();
    let (job_id, run_dir, averaging) = match &resume {
        Some(r) => {
            let dir = resume_dir.clone().expect("resume has a directory");
            check_resumable(&r.state, &params.layout_digest(), &dataset_digest)?;
            let averaging =
                ParameterServer::resume(r.parameters.clone(), job.optimizer, r.optimizer.clone())?;
            let run_dir = RunDir::reopen(&dir, &r.state.records, r.state.global_step)?;
            (r.state.job_id.clone(), run_dir, averaging)
        }
        None => {
            let initial = params.init_flat(job.seed);
            let started = chrono::Utc::now();
            let job_id = format!("{}-{}", job.model, started.format("%Y%m%d-%H%M%S"));
            let dir = config
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&job_id));
            let run_dir = RunDir::create(&dir, &job)?;
            (
                job_id,
                run_dir,
                ParameterServer::new(initial, job.optimizer),
            )
        }
    };
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
    let (board, status) = StatusBoard::new(JobStatus {
        job_id: spec.job_id.clone(),
        model: job.model.name().to_string(),
        allreduce: match config.allreduce() {
            AllreduceKind::Ps => "ps",
            AllreduceKind::Ring => "ring",
            AllreduceKind::Nccl => "nccl",
        }
        .to_string(),
        epochs: job.epochs,
        steps_per_epoch: job.steps_per_epoch(train_len),
        total_steps: job.total_steps(train_len),
        ..JobStatus::default()
    });
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let heartbeat = heartbeat_interval(config.worker_timeout());
    let first_worker_id = resume.as_ref().map_or(1, |r| r.state.next_worker_id);
    let service = CoordinatorService::new(
        spec.clone(),
        data_dir.clone(),
        events_tx.clone(),
        first_worker_id,
        heartbeat,
        status.clone(),
    )
    .require_nccl(config.allreduce() == AllreduceKind::Nccl);
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    let server_stop = CancellationToken::new();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    // Not behind the join token: probes (Kubernetes' among them) send no metadata, and the
    // health of a job is no secret.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let readiness = Readiness::default();
    readiness.set(true);
    let liveness = Liveness::default();
    let health_port = health_listener
        .map(|listener| HealthPort::spawn(listener, readiness.clone(), liveness.clone()));
    let service = InterceptedService::new(
        CoordinatorServer::new(service)
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
        ServerAuth::new(token.clone()),
    );
    let server = tokio::spawn(
        server
            .initial_stream_window_size(proto::WINDOW_BYTES)
            .initial_connection_window_size(proto::WINDOW_BYTES)
            .max_frame_size(proto::FRAME_BYTES)
            // Pings find peers that vanished without closing their connection (a partition,
            // a powered-off host); the heartbeats find those that are stopped or stuck.
            .http2_keepalive_interval(Some(config.worker_timeout()))
            .http2_keepalive_timeout(Some(config.worker_timeout()))
            .add_service(service)
            .add_service(health_service)
            .serve_with_incoming_shutdown(
                // Accepted sockets do not get the builder's TCP settings: without NODELAY,
                // Nagle and delayed ACKs add tens of milliseconds to every step.
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                server_stop.clone().cancelled_owned(),
            ),
    );
    info!(%addr, "coordinator listening");
    let metrics_server = match metrics_listener {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::io("metrics listener", e))?;
            info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
            Some(prometheus::spawn(
                listener,
                status.clone(),
                server_stop.clone(),
            ))
        }
        None => None,
    };
    let display = console::spawn(status, config.progress_every(), config.log_format);

    let local_workers = if config.external_workers {
        None
    } else {
        let spec = LaunchSpec {
            program: config
                .worker_bin
                .clone()
                .map_or(WorkerProgram::CurrentExe, WorkerProgram::Binary),
            coordinator_url: format!(
                "{}://{}",
                if config.tls_ca.is_some() {
                    "https"
                } else {
                    "http"
                },
                loopback_if_unspecified(addr)
            ),
            tls_ca: config.tls_ca.clone(),
            device: config.worker_device.clone(),
            join_token: token,
            log_format: config.log_format,
            forward_logs: console::shows_bar(config.log_format),
            data_dir,
            threads: config
                .threads_per_worker
                .unwrap_or_else(|| default_threads(config.workers)),
        };
        Some(LocalWorkers::spawn(
            &spec,
            config.workers,
            config.max_restarts,
            events_tx,
        )?)
    };

    let options = TrainerOptions {
        initial_workers: config.workers,
        min_workers: config.min_workers,
        max_workers: config.max_workers(),
        worker_timeout: config.worker_timeout(),
        pause_timeout: config.pause_timeout(),
        checkpoint_every: config.checkpoint_every,
        progress_every: config.progress_every(),
        transport: match config.allreduce() {
            AllreduceKind::Nccl => Transport::Nccl,
            AllreduceKind::Ps | AllreduceKind::Ring => Transport::Tcp,
        },
    };
    let averaging = match config.allreduce() {
        AllreduceKind::Ps => Averaging::ParameterServer(averaging),
        AllreduceKind::Ring | AllreduceKind::Nccl => Averaging::Ring(averaging),
    };
    let trainer = Trainer::new(
        job,
        spec,
        params,
        averaging,
        (train_len, test_labels),
        run_dir,
        events_rx,
        stop,
        options,
        resume.map(|r| r.state),
        board,
        liveness,
    );
    let outcome = trainer.run().await;
    set_health(&health, ServingStatus::NotServing).await;
    readiness.set(false);
    console::finish(display);

    if let Some(workers) = local_workers {
        match outcome {
            // Not dismissed, and no other coordinator will reach them.
            Err(Error::Stopped(StopCause::Terminate)) => workers.kill().await,
            _ => workers.shutdown(WORKER_EXIT_GRACE).await,
        }
    }
    if let Some(port) = health_port {
        port.stop().await;
    }
    server_stop.cancel();
    // Graceful shutdown waits for every connection to close; one that never finished its
    // HTTP/2 handshake (a port scanner, a stray client) would hold the exit up, so after a
    // short grace the remaining connections are dropped.
    let mut server = server;
    match tokio::time::timeout(SERVER_STOP_GRACE, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("gRPC server ended with an error: {e}"),
        Ok(Err(e)) => warn!("gRPC server task failed: {e}"),
        Err(_) => {
            debug!("connections still open after {SERVER_STOP_GRACE:?}: dropping them");
            server.abort();
        }
    }
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    if let Ok(summary) = &outcome {
        plots::write_plots_after_training(summary.run_dir.clone(), plots_data_dir).await;
    }
    outcome
}

/// The run directory to carry on from: `--resume`'s, or `--run-dir` when it holds a resume
/// checkpoint (a restarted coordinator given the same command). A `--run-dir` without one
/// starts a fresh job.
fn resume_dir(config: &Config) -> Result<Option<PathBuf>> {
    if let Some(dir) = &config.resume {
        if config
            .run_dir
            .as_ref()
            .is_some_and(|run_dir| run_dir != dir)
        {
            return Err(Error::Config(format!(
                "--resume {} and --run-dir {} name different directories; a resumed job \
                 writes to its own",
                dir.display(),
                config.run_dir.as_ref().expect("given").display()
            )));
        }
        return Ok(Some(dir.clone()));
    }
    Ok(config
        .run_dir
        .clone()
        .filter(|dir| dir.join("checkpoints").join(resume::FILE_NAME).is_file()))
}

/// Sets the whole server's health and the coordinator service's.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <CoordinatorServer<CoordinatorService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Refuses a checkpoint that belongs to another model build or dataset.
fn check_resumable(state: &ResumeState, layout_digest: &str, dataset_digest: &str) -> Result<()> {
    if state.layout_digest != layout_digest {
        return Err(Error::Checkpoint(format!(
            "the checkpoint's {} has layout {}, this build's has {layout_digest}",
            state.job.model, state.layout_digest
        )));
    }
    if state.dataset_digest != dataset_digest {
        return Err(Error::Checkpoint(format!(
            "the checkpoint was trained on dataset sha256 {}, --data-dir holds {dataset_digest}",
            state.dataset_digest
        )));
    }
    Ok(())
}

/// Workers send a heartbeat four times per timeout, so one late heartbeat is not an eviction.
fn heartbeat_interval(worker_timeout: Duration) -> Duration {
    (worker_timeout / 4).max(Duration::from_millis(20))
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
