//! A worker's life: connect, register, get the data, then serve the coordinator's requests
//! until it says to stop.

use crate::{Config, Error, Result, executor::Executor, transfer::receive_dataset};
use candle_core::Device;
use common::{
    dataset::{Dataset, dataset_files},
    fetch::default_data_dir,
    ids::WorkerId,
    model::ModelKind,
    replica::Replica,
};
use proto::v1::{
    CoordinatorMessage, EvalReport, Failure, GradientReport, Hello, JobSpec, RegisterRequest,
    WorkerMessage, coordinator_client::CoordinatorClient, coordinator_message::Kind as Command,
    worker_message::Kind,
};
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

/// Runs a worker until the coordinator dismisses it (`Ok`), `shutdown` is cancelled (`Ok`),
/// or something breaks.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let device = parse_device(&config.device)?;
    let data_dir = config.data_dir.clone().unwrap_or_else(default_data_dir);
    let channel = connect(&config.coordinator, config.connect_timeout(), &shutdown).await?;
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);

    let local = load_local(data_dir.clone()).await?;
    let reply = client
        .register(RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            hostname: hostname(),
            pid: std::process::id(),
            device: config.device.clone(),
            dataset_digest: local.as_ref().map(Dataset::digest).unwrap_or_default(),
        })
        .await
        .map_err(|status| Error::Refused(status.message().to_string()))?
        .into_inner();
    let worker = WorkerId(reply.worker_id);
    let job = reply
        .job
        .ok_or_else(|| Error::BadRequest("registration reply without a job".into()))?;
    info!(%worker, job = %job.job_id, model = %job.model, "registered");

    let dataset = match local {
        Some(dataset) => dataset,
        None => {
            info!(dir = %data_dir.display(), "no local dataset: receiving the coordinator's");
            receive_dataset(&mut client, &data_dir).await?;
            let dataset = load_local(data_dir)
                .await?
                .ok_or_else(|| Error::Transfer("files missing after the transfer".into()))?;
            if dataset.digest() != job.dataset_digest {
                return Err(Error::Transfer(
                    "the received files do not make the coordinator's dataset".into(),
                ));
            }
            dataset
        }
    };
    let replica = build_replica(&job, &device)?;
    let executor = Executor::new(replica, dataset, device);
    serve(client, worker, executor, shutdown).await
}

/// Answers the coordinator's requests one at a time.
async fn serve(
    mut client: CoordinatorClient<Channel>,
    worker: WorkerId,
    mut executor: Executor,
    shutdown: CancellationToken,
) -> Result<()> {
    let (outbox, outbound) = mpsc::channel(4);
    outbox
        .send(message(Kind::Hello(Hello {
            worker_id: worker.0,
        })))
        .await
        .expect("the channel is open");
    let mut inbound = client
        .session(ReceiverStream::new(outbound))
        .await?
        .into_inner();
    loop {
        let next = tokio::select! {
            next = inbound.message() => next?,
            () = shutdown.cancelled() => {
                info!("shutting down");
                return Ok(());
            }
        };
        let Some(CoordinatorMessage {
            kind: Some(command),
        }) = next
        else {
            return match next {
                None => Err(Error::CoordinatorLost("the session ended".into())),
                Some(_) => Err(Error::BadRequest("a message without content".into())),
            };
        };
        let (returned, answer) = match command {
            Command::Shutdown(shutdown) => {
                info!(reason = %shutdown.reason, "dismissed by the coordinator");
                return Ok(());
            }
            command => tokio::task::spawn_blocking(move || {
                let answer = answer(&mut executor, command);
                (executor, answer)
            })
            .await
            .expect("computation does not panic"),
        };
        executor = returned;
        match answer {
            Ok(kind) => {
                if outbox.send(message(kind)).await.is_err() {
                    return Err(Error::CoordinatorLost("the session closed".into()));
                }
            }
            Err(e) => {
                warn!("cannot answer: {e}");
                let failure = Kind::Failure(Failure {
                    message: e.to_string(),
                });
                let _ = outbox.send(message(failure)).await;
                return Err(e);
            }
        }
    }
}

/// Computes the answer to one request.
fn answer(executor: &mut Executor, command: Command) -> Result<Kind> {
    match command {
        Command::Compute(compute) => {
            let started = Instant::now();
            let parameters = decode_f32("parameters", &compute.parameters)?;
            let indices = proto::decode_u32("indices", &compute.indices)
                .map_err(|e| Error::BadRequest(e.to_string()))?;
            let result = executor.gradient(&parameters, &indices, compute.dropout_seed)?;
            Ok(Kind::Gradient(GradientReport {
                step: compute.step,
                count: result.count,
                loss_sum: result.loss_sum,
                correct: result.correct,
                gradient: proto::encode_f32(&result.gradient),
                compute_seconds: started.elapsed().as_secs_f64(),
            }))
        }
        Command::Evaluate(evaluate) => {
            let parameters = decode_f32("parameters", &evaluate.parameters)?;
            let range = to_usize(evaluate.start)?..to_usize(evaluate.end)?;
            let sums = executor.evaluate(&parameters, range)?;
            Ok(Kind::Eval(EvalReport {
                epoch: evaluate.epoch,
                count: sums.count,
                loss_sum: sums.loss_sum,
                correct: sums.correct,
            }))
        }
        Command::Shutdown(_) => unreachable!("handled by the caller"),
    }
}

/// Builds the job's model and checks it is the coordinator's, parameter for parameter.
fn build_replica(job: &JobSpec, device: &Device) -> Result<Replica> {
    let kind: ModelKind = job.model.parse()?;
    let replica = Replica::new(kind, device)?;
    let params = replica.params();
    if params.len() as u64 != job.parameter_count || params.layout_digest() != job.layout_digest {
        return Err(Error::Refused(format!(
            "this worker's {kind} has {} parameters (layout {}), the coordinator's has {} \
             (layout {}): different builds",
            params.len(),
            params.layout_digest(),
            job.parameter_count,
            job.layout_digest
        )));
    }
    Ok(replica)
}

/// Connects, retrying with backoff until `timeout`: workers may start before the coordinator.
async fn connect(url: &str, timeout: Duration, shutdown: &CancellationToken) -> Result<Channel> {
    let unreachable = |reason: String| Error::Unreachable {
        url: url.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| unreachable(format!("not a valid URL: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(proto::WINDOW_BYTES)
        .initial_connection_window_size(proto::WINDOW_BYTES);
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if Instant::now() + delay < deadline => {
                info!("coordinator not reachable yet ({e}); retrying in {delay:?}");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Err(unreachable("shut down while connecting".into())),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(unreachable(format!("{e} (gave up after {timeout:?})"))),
        }
    }
}

/// The dataset in `dir`, or `None` when the directory lacks the files.
async fn load_local(dir: PathBuf) -> Result<Option<Dataset>> {
    tokio::task::spawn_blocking(move || {
        if dataset_files(&dir).is_err() {
            return Ok(None);
        }
        Dataset::load(&dir).map(Some)
    })
    .await
    .expect("loading does not panic")
    .map_err(Error::from)
}

fn parse_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = name.strip_prefix("cuda:").and_then(|n| n.parse().ok()) else {
        return Err(Error::Device(name.into(), "expected cpu or cuda:N".into()));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(
            name.into(),
            "this build has no CUDA support (build with --features cuda)".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device(name.into(), e.to_string()))
}

fn decode_f32(field: &'static str, bytes: &[u8]) -> Result<Vec<f32>> {
    proto::decode_f32(field, bytes).map_err(|e| Error::BadRequest(e.to_string()))
}

fn to_usize(value: u64) -> Result<usize> {
    usize::try_from(value).map_err(|_| Error::BadRequest(format!("{value} is out of range")))
}

fn message(kind: Kind) -> WorkerMessage {
    WorkerMessage { kind: Some(kind) }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
