//! A worker's life: connect, register, get the data, then serve the coordinator's requests
//! until it says to stop. When the session breaks (the coordinator restarts, or evicts this
//! worker) the worker registers again and carries on, keeping its data and model.

use crate::{
    Config, Error, Result,
    executor::Executor,
    ring::RingListener,
    ring_replica::{self, RingReplica},
    transfer::receive_dataset,
};
use candle_core::Device;
use common::{
    dataset::{Dataset, dataset_files},
    device::parse_device,
    fetch::default_data_dir,
    ids::WorkerId,
    job::JobConfig,
    model::ModelKind,
    replica::Replica,
};
use proto::{
    client::EndpointError,
    health::{HealthPort, Liveness, Readiness},
    security::ClientAuth,
    v1::{
        CoordinatorMessage, EvalReport, Failure, GradientReport, Heartbeat, Hello, JobSpec,
        RegisterRequest, Shutdown, ShutdownCause, WorkerMessage,
        coordinator_client::CoordinatorClient, coordinator_message::Kind as Command,
        worker_message::Kind,
    },
};
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Streaming,
    transport::{Channel, Endpoint},
};
use tracing::{info, warn};

pub use proto::client::Client;

/// Runs a worker until the coordinator dismisses it (`Ok`), `shutdown` is cancelled (`Ok`),
/// or something breaks that registering again cannot mend.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let device = parse_device(&config.device)?;
    let data_dir = config.data_dir.clone().unwrap_or_else(default_data_dir);
    let auth = ClientAuth::new(config.credentials.join_token()?);
    let endpoint = endpoint(&config)?;
    let liveness = Liveness::default();
    let health = match config.health_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Usage(format!("--health-listen {addr}: {e}")))?;
            let ready = Readiness::default();
            ready.set(true);
            Some(HealthPort::spawn(listener, ready, liveness.clone()))
        }
        None => None,
    };
    let outcome = serve_job(
        &config, &shutdown, &liveness, device, data_dir, auth, endpoint,
    )
    .await;
    if let Some(health) = health {
        health.stop().await;
    }
    outcome
}

/// Registers, serves sessions and registers again until the job is over for this worker.
async fn serve_job(
    config: &Config,
    shutdown: &CancellationToken,
    liveness: &Liveness,
    device: Device,
    data_dir: PathBuf,
    auth: ClientAuth,
    endpoint: Endpoint,
) -> Result<()> {
    let mut dataset = load_local(data_dir.clone()).await?;
    // Bound once: the ring port a worker advertises stays the same across registrations.
    let ring_listener =
        Arc::new(
            RingListener::bind(config.ring_listen).map_err(|source| Error::Io {
                path: PathBuf::from(format!("ring listener {}", config.ring_listen)),
                source,
            })?,
        );
    let local_digest = dataset.as_ref().map(Dataset::digest).unwrap_or_default();
    let mut executor: Option<(JobSpec, Executor)> = None;
    let mut gradients = 0u64;
    let mut retry = Backoff::default();
    loop {
        let channel = match connect(&endpoint, config.connect_timeout(), shutdown, liveness).await {
            Ok(channel) => channel,
            Err(_) if shutdown.is_cancelled() => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut client = CoordinatorClient::with_interceptor(channel, auth.clone())
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
        let request = RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            hostname: hostname(),
            pid: std::process::id(),
            device: config.device.clone(),
            dataset_digest: local_digest.clone(),
            ring_port: u32::from(ring_listener.local_addr().port()),
            ring_host: config.ring_host.clone().unwrap_or_default(),
            nccl: cfg!(feature = "nccl") && device.is_cuda(),
        };
        let reply = match client.register(request).await.map_err(Error::from) {
            Ok(reply) => reply.into_inner(),
            Err(e) if e.is_retryable() => {
                let delay = retry.next();
                warn!("registration failed ({e}); retrying in {delay:?}");
                pause(shutdown, delay).await;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let worker = WorkerId(reply.worker_id);
        let job = reply
            .job
            .ok_or_else(|| Error::BadRequest("registration reply without a job".into()))?;
        info!(%worker, job = %job.job_id, model = %job.model, "registered");
        let heartbeat = Duration::from_millis(reply.heartbeat_interval_ms.clamp(10, 60_000));

        // The same job (a restarted coordinator resumes it) keeps the executor; another job
        // gets a new model over the same data.
        let ready = match executor.take() {
            Some((spec, ready)) if same_model(&spec, &job) => ready,
            previous => {
                let data = match (previous, dataset.take()) {
                    (Some((_, old)), _) => old.into_dataset(),
                    (None, Some(data)) => data,
                    (None, None) => {
                        info!(dir = %data_dir.display(), "no local dataset: receiving the coordinator's");
                        receive_dataset(&mut client, &data_dir, liveness).await?;
                        load_local(data_dir.clone()).await?.ok_or_else(|| {
                            Error::Transfer("files missing after the transfer".into())
                        })?
                    }
                };
                if data.digest() != job.dataset_digest {
                    return Err(Error::Transfer(
                        "this worker's dataset is not the coordinator's".into(),
                    ));
                }
                Executor::new(build_replica(&job, &device)?, data, device.clone())
            }
        };
        let job_config: JobConfig = serde_json::from_str(&job.config_json)
            .map_err(|e| Error::BadRequest(format!("the job's settings do not parse: {e}")))?;
        let mut session = Session {
            worker,
            secret: reply.session_secret,
            heartbeat,
            gradients: &mut gradients,
            fail_after: config.fail_after_steps,
            liveness,
        };
        let mut slot = Some(Engine {
            executor: ready,
            ring: RingReplica::new(
                Arc::clone(&ring_listener),
                device.clone(),
                job_config.optimizer,
                config.ring_shared_memory,
            ),
        });
        let outcome = session.serve(&mut client, &mut slot, shutdown).await;
        executor = slot.map(|engine| (job, engine.executor));
        match outcome {
            Ok(()) => return Ok(()),
            Err(e @ Error::JobFull(_)) => {
                warn!("{e}; registering again in {JOB_FULL_WAIT:?}");
                pause(shutdown, JOB_FULL_WAIT).await;
            }
            Err(e) if e.is_retryable() => {
                retry = Backoff::default();
                warn!("{e}; registering again");
                pause(shutdown, retry.next()).await;
            }
            Err(e) => return Err(e),
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// What computes the answers: the model and data, and for ring jobs the replica being
/// trained. The executor outlives a session; the ring replica is set up afresh in each.
struct Engine {
    executor: Executor,
    ring: RingReplica,
}

/// How long a worker turned away from a full job waits before it asks again.
const JOB_FULL_WAIT: Duration = Duration::from_secs(10);

/// How often the session loop shows it is alive while it waits for the coordinator.
const IDLE_BEAT: Duration = Duration::from_secs(1);

/// One registration's session.
struct Session<'a> {
    worker: WorkerId,
    /// What the registration returned, to prove the session is this registration's.
    secret: String,
    heartbeat: Duration,
    /// Gradients computed by this process, across sessions.
    gradients: &'a mut u64,
    fail_after: Option<u64>,
    /// Beaten while the loop waits; not while it computes, so that a computation that never
    /// ends shows on the health port.
    liveness: &'a Liveness,
}

impl Session<'_> {
    /// Answers the coordinator's requests one at a time, with heartbeats alongside.
    async fn serve(
        &mut self,
        client: &mut Client,
        executor: &mut Option<Engine>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let (outbox, outbound) = mpsc::channel(4);
        outbox
            .send(message(Kind::Hello(Hello {
                worker_id: self.worker.0,
                session_secret: self.secret.clone(),
            })))
            .await
            .expect("the channel is open");
        let _heartbeats = AbortOnDrop(tokio::spawn(send_heartbeats(
            outbox.clone(),
            self.heartbeat,
        )));
        let mut inbound = client
            .session(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        let mut beat = tokio::time::interval(IDLE_BEAT);
        loop {
            self.liveness.beat();
            let next = tokio::select! {
                next = inbound.message() => next?,
                _ = beat.tick() => continue,
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
            let answer = match command {
                Command::Shutdown(shutdown) => return dismissed(shutdown),
                Command::Evicted(evicted) => return Err(Error::Evicted(evicted.reason)),
                command => {
                    let is_gradient = matches!(command, Command::Compute(_) | Command::RingStep(_));
                    let answer = compute(executor, command).await;
                    if is_gradient && answer.is_ok() {
                        *self.gradients += 1;
                        if self.fail_after.is_some_and(|n| *self.gradients >= n) {
                            return Err(Error::InjectedFault(*self.gradients));
                        }
                    }
                    answer
                }
            };
            match answer {
                Ok(kind) => {
                    if outbox.send(message(kind)).await.is_err() {
                        return last_word(&mut inbound).await;
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
}

/// How long a worker whose answer could not be sent looks for the coordinator's last message.
const LAST_WORD_WAIT: Duration = Duration::from_secs(1);

/// The session closed while this worker was computing. When the coordinator ends a session
/// (a dismissal, an eviction) HTTP/2 closes the worker's side as well, so the answer cannot
/// be sent, yet the reason may still be waiting unread: act on it rather than take the
/// close for a lost coordinator.
async fn last_word(inbound: &mut Streaming<CoordinatorMessage>) -> Result<()> {
    let lost = || Error::CoordinatorLost("the session closed".into());
    loop {
        let next = tokio::time::timeout(LAST_WORD_WAIT, inbound.message()).await;
        let Ok(Ok(Some(CoordinatorMessage {
            kind: Some(command),
        }))) = next
        else {
            return Err(lost());
        };
        match command {
            Command::Shutdown(shutdown) => return dismissed(shutdown),
            Command::Evicted(evicted) => return Err(Error::Evicted(evicted.reason)),
            // A request queued before the end: it will not be answered.
            _ => continue,
        }
    }
}

/// What the coordinator's `Shutdown` means for this worker: the job is over (leave with
/// success), full (ask again later), or done with this worker (leave with a failure).
fn dismissed(shutdown: Shutdown) -> Result<()> {
    match shutdown.cause() {
        ShutdownCause::JobEnded => {
            info!(reason = %shutdown.reason, "dismissed by the coordinator");
            Ok(())
        }
        ShutdownCause::JobFull => Err(Error::JobFull(shutdown.reason)),
        ShutdownCause::Refused => Err(Error::Refused(shutdown.reason)),
    }
}

/// Runs one request on a blocking thread, so heartbeats keep flowing meanwhile.
async fn compute(slot: &mut Option<Engine>, command: Command) -> Result<Kind> {
    // `spawn_blocking` needs `'static`: the engine moves there and back.
    let mut engine = slot.take().expect("the engine is back after each request");
    let (engine, answer) = tokio::task::spawn_blocking(move || {
        let answer = answer(&mut engine, command);
        (engine, answer)
    })
    .await
    .expect("computation does not panic");
    *slot = Some(engine);
    answer
}

async fn send_heartbeats(outbox: mpsc::Sender<WorkerMessage>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if outbox
            .send(message(Kind::Heartbeat(Heartbeat {})))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Stops the heartbeats when the session ends, however it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Computes the answer to one request.
fn answer(engine: &mut Engine, command: Command) -> Result<Kind> {
    let executor = &mut engine.executor;
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
                ..Default::default()
            }))
        }
        Command::SetupRing(setup) => Ok(Kind::RingReady(engine.ring.setup(setup)?)),
        Command::RingStep(step) => Ok(Kind::Gradient(engine.ring.step(executor, &step)?)),
        Command::NcclIdRequest(request) => Ok(Kind::NcclId(ring_replica::nccl_id(&request))),
        Command::StateRequest(request) => {
            Ok(Kind::State(engine.ring.state(request.committed_steps)?))
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
                start: evaluate.start,
                end: evaluate.end,
                class_count: sums.class_count.to_vec(),
                class_correct: sums.class_correct.to_vec(),
            }))
        }
        Command::Shutdown(_) | Command::Evicted(_) => unreachable!("handled by the caller"),
    }
}

/// Whether the job is the one `spec` describes, as far as the model is concerned.
fn same_model(spec: &JobSpec, job: &JobSpec) -> bool {
    spec.model == job.model
        && spec.layout_digest == job.layout_digest
        && spec.dataset_digest == job.dataset_digest
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

/// The coordinator's address with this worker's transport settings.
fn endpoint(config: &Config) -> Result<Endpoint> {
    let url = &config.coordinator;
    let endpoint = proto::client::endpoint(url, config.credentials.tls().as_ref())
        .map_err(|e| match e {
            EndpointError::Security(e) => Error::Security(e),
            e => Error::Usage(format!("--coordinator {url}: {e}")),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(proto::WINDOW_BYTES)
        .initial_connection_window_size(proto::WINDOW_BYTES)
        .max_frame_size(proto::FRAME_BYTES)
        // A coordinator that vanished without closing the connection is noticed by pings.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint)
}

/// How often a worker that cannot reach its coordinator says so again.
const STILL_UNREACHABLE_EVERY: Duration = Duration::from_secs(30);

/// Connects, retrying with backoff until `timeout` (`None`: as long as it takes): workers may
/// start long before the coordinator, and reconnect while it restarts.
async fn connect(
    endpoint: &Endpoint,
    timeout: Option<Duration>,
    shutdown: &CancellationToken,
    liveness: &Liveness,
) -> Result<Channel> {
    let unreachable = |reason: String| Error::Unreachable {
        url: endpoint.uri().to_string(),
        reason,
    };
    let started = Instant::now();
    let mut backoff = Backoff::default();
    let mut last_said: Option<Instant> = None;
    loop {
        liveness.beat();
        let error = match endpoint.connect().await {
            Ok(channel) => {
                if last_said.is_some() {
                    info!(
                        "coordinator reached after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(channel);
            }
            Err(e) => e,
        };
        let delay = backoff.next();
        if timeout.is_some_and(|timeout| started.elapsed() + delay >= timeout) {
            let timeout = timeout.unwrap_or_default();
            return Err(unreachable(format!("{error} (gave up after {timeout:?})")));
        }
        // One line at first, then one every half minute: a worker started long before its
        // coordinator must not flood the log.
        if last_said.is_none_or(|said| said.elapsed() >= STILL_UNREACHABLE_EVERY) {
            match last_said {
                None => info!("coordinator not reachable yet ({error}); retrying"),
                Some(_) => info!(
                    "coordinator still not reachable after {:.0} s ({error}); retrying",
                    started.elapsed().as_secs_f64()
                ),
            }
            last_said = Some(Instant::now());
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Err(unreachable("shut down while connecting".into())),
        }
    }
}

/// Exponential backoff from 100 ms to 2 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    /// The next delay; each is twice the last, up to 2 s.
    fn next(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        delay
    }
}

/// A wait before registering again, cut short by shutdown.
async fn pause(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = shutdown.cancelled() => {}
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
