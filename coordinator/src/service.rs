//! The gRPC face of the coordinator: registration, worker sessions, dataset transfer and the
//! job's status. Protobuf types stop here; the training loop sees [`Event`]s and publishes
//! [`JobStatus`] snapshots.

use crate::{
    event::{Event, Report},
    limits,
    membership::shutdown_message,
    status::{JobStatus, Phase, WorkerState},
};
use common::{dataset::dataset_files, ids::WorkerId};
use proto::v1::{
    DatasetChunk, FetchDatasetRequest, GradientReport, Hello, JobPhase, JobSpec, NcclId,
    RegisterReply, RegisterRequest, RingReady, StatusReply, StatusRequest, WorkerMessage,
    coordinator_server::Coordinator, worker_message::Kind,
};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{
    io::AsyncReadExt,
    sync::{
        mpsc::{self, error::SendError},
        watch,
    },
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// Size of the pieces a dataset file is sent in.
const CHUNK_BYTES: usize = 1 << 20;

/// How long a registration waits for its session. A worker opens it at once; whoever
/// registers and never does only costs this much.
const REGISTRATION_EXPIRY: Duration = Duration::from_secs(60);

/// Registrations waiting for their session, at most: beyond, `Register` answers
/// `RESOURCE_EXHAUSTED`. Each is bounded (see [`crate::limits`]), so together they hold well
/// under a megabyte.
pub const MAX_PENDING_REGISTRATIONS: usize = 256;

/// A registration whose session has not opened yet.
struct Registration {
    /// Where it registered from, and where its ring listener is reached.
    address: String,
    ring_address: Option<String>,
    /// What its `Hello` must present: only the registrant learnt it.
    secret: String,
    at: Instant,
}

/// The coordinator's gRPC service.
pub struct CoordinatorService {
    job: JobSpec,
    data_dir: PathBuf,
    events: mpsc::UnboundedSender<Event>,
    next_id: AtomicU64,
    /// Registrations waiting for their session; taken out when it opens, dropped when they
    /// expire.
    registered: Mutex<HashMap<WorkerId, Registration>>,
    /// [`REGISTRATION_EXPIRY`], shorter in tests.
    registration_expiry: Duration,
    heartbeat_interval: Duration,
    status: watch::Receiver<JobStatus>,
    /// Whether only workers that can sum with NCCL may join (`--allreduce nccl`).
    nccl_required: bool,
}

impl CoordinatorService {
    /// A service for `job`, serving the dataset in `data_dir` and reporting to `events`.
    /// Worker ids start at `first_worker_id` (a resumed job continues its numbering);
    /// workers are asked for a heartbeat every `heartbeat_interval`. `Status` answers from
    /// `status`.
    pub fn new(
        job: JobSpec,
        data_dir: PathBuf,
        events: mpsc::UnboundedSender<Event>,
        first_worker_id: u64,
        heartbeat_interval: Duration,
        status: watch::Receiver<JobStatus>,
    ) -> Self {
        CoordinatorService {
            job,
            data_dir,
            events,
            next_id: AtomicU64::new(first_worker_id.max(1)),
            registered: Mutex::default(),
            registration_expiry: REGISTRATION_EXPIRY,
            heartbeat_interval,
            status,
            nccl_required: false,
        }
    }

    /// Admits only workers that can sum with NCCL, when `required`.
    pub fn require_nccl(self, required: bool) -> Self {
        CoordinatorService {
            nccl_required: required,
            ..self
        }
    }

    /// Registrations expire after `expiry` instead of [`REGISTRATION_EXPIRY`].
    #[cfg(test)]
    fn expiring_after(self, expiry: Duration) -> Self {
        CoordinatorService {
            registration_expiry: expiry,
            ..self
        }
    }

    fn check_registration(&self, request: &RegisterRequest) -> Result<(), Status> {
        // The identity fields first: every later message, and the log line of a refusal,
        // may show them.
        check_identity(request)?;
        if request.protocol_version != proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks protocol version {}, this coordinator speaks {}",
                request.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        if self.nccl_required && !request.nccl {
            return Err(Status::failed_precondition(format!(
                "this job sums gradients with NCCL (--allreduce nccl), and this worker cannot \
                 (device {}): build it with --features nccl and start it with --device cuda:N",
                request.device
            )));
        }
        if !request.dataset_digest.is_empty() && request.dataset_digest != self.job.dataset_digest {
            return Err(Status::failed_precondition(format!(
                "worker's local dataset (sha256 {}) differs from the coordinator's (sha256 {}); \
                 point --data-dir at the same files or at an empty directory to receive them",
                short(&request.dataset_digest),
                short(&self.job.dataset_digest)
            )));
        }
        Ok(())
    }

    /// Records a registration under a new id, dropping those that expired first; refused when
    /// too many are waiting for their session.
    fn add_registration(&self, registration: Registration) -> Result<WorkerId, Status> {
        let mut registered = self.registered.lock().expect("poisoned");
        registered.retain(|_, r| r.at.elapsed() < self.registration_expiry);
        if registered.len() >= MAX_PENDING_REGISTRATIONS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_PENDING_REGISTRATIONS} registrations are waiting for their session \
                 already; try again later (a registration expires {:.0} s after it is made)",
                self.registration_expiry.as_secs_f64()
            )));
        }
        let worker = WorkerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        registered.insert(worker, registration);
        Ok(worker)
    }

    /// Takes the registration `hello` names, if `hello` proves it is the registrant's. A
    /// wrong secret leaves the registration to its owner.
    fn take_registration(&self, hello: &Hello) -> Result<Registration, Status> {
        let worker = WorkerId(hello.worker_id);
        let mut registered = self.registered.lock().expect("poisoned");
        let expired = registered
            .get(&worker)
            .is_some_and(|r| r.at.elapsed() >= self.registration_expiry);
        if expired {
            registered.remove(&worker);
        }
        let Some(registration) = registered.get(&worker) else {
            return Err(Status::not_found(format!(
                "worker {worker} has no registration waiting for its session (never made, \
                 expired after {:.0} s, or its session is open already); call Register first",
                self.registration_expiry.as_secs_f64()
            )));
        };
        if !same_secret(&registration.secret, &hello.session_secret) {
            return Err(Status::permission_denied(format!(
                "the session secret for worker {worker} is wrong: a session is opened with the \
                 `session_secret` its own Register call returned"
            )));
        }
        Ok(registered.remove(&worker).expect("present"))
    }
}

/// Refuses identity fields that are oversized or hold control characters, naming the field.
fn check_identity(request: &RegisterRequest) -> Result<(), Status> {
    limits::check_identity("hostname", &request.hostname, limits::MAX_HOSTNAME_BYTES)
        .and_then(|()| limits::check_identity("device", &request.device, limits::MAX_DEVICE_BYTES))
        .and_then(|()| {
            limits::check_identity("ring_host", &request.ring_host, limits::MAX_RING_HOST_BYTES)
        })
        .and_then(|()| limits::check_digest("dataset_digest", &request.dataset_digest))
        .map_err(Status::invalid_argument)
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(expected: &str, given: &str) -> bool {
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0, |differ, (a, b)| differ | (a ^ b))
            == 0
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        if let Err(status) = self.check_registration(&request) {
            warn!(?peer, host = %limits::free_text(&request.hostname), "registration refused: {}", status.message());
            return Err(status);
        }
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let registration = Registration {
            address: peer.map_or_else(|| "unknown".to_string(), |peer| peer.to_string()),
            ring_address: ring_address(&request, peer),
            secret: secret.clone(),
            at: Instant::now(),
        };
        let worker = self.add_registration(registration).inspect_err(|status| {
            warn!(?peer, "registration refused: {}", status.message());
        })?;
        info!(%worker, ?peer, host = %request.hostname, pid = request.pid, device = %request.device, "worker registered");
        Ok(Response::new(RegisterReply {
            worker_id: worker.0,
            job: Some(self.job.clone()),
            heartbeat_interval_ms: self.heartbeat_interval.as_millis().max(1) as u64,
            session_secret: secret,
        }))
    }

    type SessionStream = ReceiverStream<Result<proto::v1::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(Kind::Hello(hello)) = inbound.message().await?.and_then(|m| m.kind) else {
            return Err(Status::invalid_argument(
                "the first message of a session must be `hello`",
            ));
        };
        let worker = WorkerId(hello.worker_id);
        let Registration {
            address,
            ring_address,
            ..
        } = self.take_registration(&hello).inspect_err(|status| {
            warn!(%worker, "session refused: {}", status.message());
        })?;
        // Small: the loop sends one request per worker and waits for its answer.
        let (outbox, outbound) = mpsc::channel(4);
        let events = self.events.clone();
        if let Err(SendError(Event::Joined { outbox, .. })) = events.send(Event::Joined {
            worker,
            outbox,
            address,
            ring_address,
        }) {
            // Stopped for a restart: the worker should find the coordinator that carries the
            // job on, so this is a transient failure, which it retries.
            if self.status.borrow().phase == Phase::Stopped {
                return Err(Status::unavailable(
                    "the coordinator is stopping; the job carries on from its checkpoint",
                ));
            }
            // The training loop has ended: a worker that arrives now is told to leave
            // rather than left to register again and again.
            let _ = outbox.try_send(Ok(shutdown_message("the job has ended")));
            return Ok(Response::new(ReceiverStream::new(outbound)));
        }
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let report = into_report(message.kind);
                        if let Report::Gradient(g) = &report {
                            if drop_report() {
                                continue;
                            }
                            if let Some(delay) = report_delay() {
                                tokio::time::sleep(delay).await;
                            }
                            if duplicate_report() {
                                let copy = Report::Gradient(g.clone());
                                let _ = events.send(Event::Report {
                                    worker,
                                    report: copy,
                                });
                            }
                        }
                        if events.send(Event::Report { worker, report }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "closed its session".to_string(),
                    Err(status) => {
                        break format!("session broke: {}", limits::free_text(status.message()));
                    }
                }
            };
            let _ = events.send(Event::Left { worker, reason });
        });
        Ok(Response::new(ReceiverStream::new(outbound)))
    }

    type FetchDatasetStream = ReceiverStream<Result<DatasetChunk, Status>>;

    async fn fetch_dataset(
        &self,
        request: Request<FetchDatasetRequest>,
    ) -> Result<Response<Self::FetchDatasetStream>, Status> {
        info!(peer = ?request.remote_addr(), "sending the dataset");
        let files = dataset_files(&self.data_dir)
            .map_err(|e| Status::unavailable(format!("dataset not available: {e}")))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for path in files {
                if let Err(status) = send_file(&path, &tx).await {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        // Clone out of the borrow: the training loop's next `send` must not wait on us.
        let status = self.status.borrow().clone();
        Ok(Response::new(StatusReply::from(&status)))
    }
}

impl From<&JobStatus> for StatusReply {
    fn from(s: &JobStatus) -> Self {
        let phase = match s.phase {
            Phase::WaitingForWorkers => JobPhase::WaitingForWorkers,
            Phase::Training => JobPhase::Training,
            Phase::Evaluating => JobPhase::Evaluating,
            Phase::Paused => JobPhase::Paused,
            Phase::Done => JobPhase::Done,
            Phase::Failed => JobPhase::Failed,
            Phase::Stopped => JobPhase::Stopped,
        };
        StatusReply {
            job_id: s.job_id.clone(),
            model: s.model.clone(),
            allreduce: s.allreduce.clone(),
            phase: phase.into(),
            epoch: s.epoch,
            epochs: s.epochs,
            step: s.step,
            steps_per_epoch: s.steps_per_epoch,
            global_step: s.global_step,
            total_steps: s.total_steps,
            images_trained: s.images_trained,
            train_loss: s.train_loss,
            images_per_sec: s.images_per_sec,
            last_step_seconds: s.last_step_seconds,
            elapsed_seconds: s.elapsed_seconds,
            evaluated: s.last_test.is_some(),
            test_accuracy: s.last_test.map_or(0.0, |(accuracy, _)| accuracy),
            test_loss: s.last_test.map_or(0.0, |(_, loss)| loss),
            workers: s
                .workers
                .iter()
                .map(|w| proto::v1::WorkerStatus {
                    worker_id: w.id.0,
                    address: w.address.clone(),
                    state: match w.state {
                        WorkerState::Joining => proto::v1::WorkerState::Joining,
                        WorkerState::Active => proto::v1::WorkerState::Active,
                        WorkerState::Evicted => proto::v1::WorkerState::Evicted,
                        WorkerState::Left => proto::v1::WorkerState::Left,
                    }
                    .into(),
                    reason: w.reason.clone(),
                    last_step_seconds: w.last_step_seconds,
                    images_per_sec: w.images_per_sec,
                    steps: w.steps,
                    images: w.images,
                })
                .collect(),
            error: s.error.clone(),
        }
    }
}

/// A worker's message as the training loop sees it, with its free text made safe
/// ([`limits::free_text`]); the loop judges the rest.
fn into_report(kind: Option<Kind>) -> Report {
    match kind {
        Some(Kind::Gradient(g)) => Report::Gradient(GradientReport {
            ring_error: limits::free_text(&g.ring_error),
            problem: limits::free_text(&g.problem),
            ..g
        }),
        Some(Kind::Eval(e)) => Report::Eval(e),
        Some(Kind::Failure(f)) => Report::Failure(limits::free_text(&f.message)),
        Some(Kind::Heartbeat(_)) => Report::Heartbeat,
        Some(Kind::RingReady(ready)) => Report::RingReady(RingReady {
            error: limits::free_text(&ready.error),
            transport: limits::free_text(&ready.transport),
            ..ready
        }),
        Some(Kind::NcclId(id)) => Report::NcclId(NcclId {
            error: limits::free_text(&id.error),
            ..id
        }),
        Some(Kind::State(state)) => Report::State(state),
        Some(Kind::Hello(_)) | None => Report::Failure("sent an unexpected message kind".into()),
    }
}

/// Sends one file in chunks; the last chunk carries the file's SHA-256.
async fn send_file(
    path: &std::path::Path,
    tx: &mpsc::Sender<Result<DatasetChunk, Status>>,
) -> Result<(), Status> {
    let io_error = |e: std::io::Error| Status::internal(format!("{}: {e}", path.display()));
    let mut file = tokio::fs::File::open(path).await.map_err(io_error)?;
    let file_size = file.metadata().await.map_err(io_error)?.len();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    loop {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            let read = file.read(&mut buffer[filled..]).await.map_err(io_error)?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        buffer.truncate(filled);
        hasher.update(&buffer);
        let last = offset + filled as u64 >= file_size;
        let chunk = DatasetChunk {
            file_name: file_name.clone(),
            offset,
            file_size,
            sha256: if last {
                hex::encode(hasher.clone().finalize())
            } else {
                String::new()
            },
            data: buffer.into(),
        };
        offset += filled as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(());
        }
        if last {
            return Ok(());
        }
    }
}

// Failpoints on a gradient answer in flight, for the `failpoints` test binary (without the
// `failpoints` feature they never fire). Heartbeats pass untouched, so that an action
// counts answers only.

/// `report-drop`: the answer is lost; the worker looks like a straggler.
fn drop_report() -> bool {
    fail::fail_point!("report-drop", |_| true);
    false
}

/// `report-delay`, configured as `return(MILLISECONDS)`: the answer (and what the worker
/// sends after it) is held back that long. An async sleep: fail's own `sleep` action would
/// block a runtime thread.
fn report_delay() -> Option<Duration> {
    fail::fail_point!("report-delay", |ms: Option<String>| ms
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis));
    None
}

/// `report-duplicate`: the answer is forwarded twice.
fn duplicate_report() -> bool {
    fail::fail_point!("report-duplicate", |_| true);
    false
}

/// Where the other workers reach this worker's ring listener: the host it names, else the
/// address its connection comes from. `None` when it has no listener.
fn ring_address(request: &RegisterRequest, peer: Option<std::net::SocketAddr>) -> Option<String> {
    let port = u16::try_from(request.ring_port).ok().filter(|&p| p != 0)?;
    if request.ring_host.is_empty() {
        let ip = peer?.ip();
        Some(std::net::SocketAddr::new(ip, port).to_string())
    } else if request.ring_host.contains(':') && !request.ring_host.starts_with('[') {
        // An IPv6 literal.
        Some(format!("[{}]:{port}", request.ring_host))
    } else {
        Some(format!("{}:{port}", request.ring_host))
    }
}

/// The start of a digest, for messages. By characters: a digest is checked to be hex before
/// it is shown, but a byte index into a client's string need not fall on a character.
fn short(digest: &str) -> String {
    digest.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{
        coordinator_client::CoordinatorClient, coordinator_message::Kind as Command,
        coordinator_server::CoordinatorServer,
    };
    use tokio_stream::wrappers::TcpListenerStream;

    /// Serves `service` on a loopback port; returns a client of it.
    async fn serve(service: CoordinatorService) -> CoordinatorClient<tonic::transport::Channel> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    fn service(events: mpsc::UnboundedSender<Event>) -> CoordinatorService {
        CoordinatorService::new(
            JobSpec::default(),
            PathBuf::new(),
            events,
            1,
            Duration::from_secs(1),
            watch::channel(JobStatus::default()).1,
        )
    }

    fn registration() -> RegisterRequest {
        RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            hostname: "node-1".into(),
            device: "cpu".into(),
            ..Default::default()
        }
    }

    fn hello(worker_id: u64, secret: &str) -> WorkerMessage {
        WorkerMessage {
            kind: Some(Kind::Hello(Hello {
                worker_id,
                session_secret: secret.into(),
            })),
        }
    }

    #[tokio::test]
    async fn identity_fields_too_long_or_with_control_characters_are_refused_by_name() {
        let (events, _loop_side) = mpsc::unbounded_channel();
        let mut client = serve(service(events)).await;
        for (request, named) in [
            (
                RegisterRequest {
                    hostname: "h".repeat(limits::MAX_HOSTNAME_BYTES + 1),
                    ..registration()
                },
                "hostname is 256 bytes long; at most 255",
            ),
            (
                RegisterRequest {
                    hostname: "node\n2026-01-01T00:00:00Z  INFO forged".into(),
                    ..registration()
                },
                "hostname holds the control character",
            ),
            (
                RegisterRequest {
                    ring_host: "r".repeat(100_000),
                    ..registration()
                },
                "ring_host is 100000 bytes long",
            ),
            (
                RegisterRequest {
                    device: "cpu\u{1b}[2J".into(),
                    ..registration()
                },
                "device holds",
            ),
            (
                RegisterRequest {
                    dataset_digest: "\u{e9}".repeat(32),
                    ..registration()
                },
                "dataset_digest must be empty or 64",
            ),
        ] {
            let refused = client.register(request).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
            assert!(refused.message().contains(named), "{}", refused.message());
        }
        assert!(client.register(registration()).await.is_ok());
    }

    /// Ids are sequential, so anyone can guess the next one: the session secret keeps it for
    /// the client that registered.
    #[tokio::test]
    async fn a_session_with_the_wrong_secret_is_refused_and_the_owner_still_opens_its_own() {
        let (events, mut loop_side) = mpsc::unbounded_channel();
        let mut client = serve(service(events)).await;
        let reply = client.register(registration()).await.unwrap().into_inner();
        assert_eq!(reply.session_secret.len(), 32);
        let other = client.register(registration()).await.unwrap().into_inner();
        assert_ne!(reply.session_secret, other.session_secret);

        for secret in [
            "",
            "0123456789abcdef0123456789abcdef",
            &other.session_secret,
        ] {
            let refused = client
                .session(tokio_stream::iter([hello(reply.worker_id, secret)]))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
            assert!(
                refused.message().contains("secret"),
                "{}",
                refused.message()
            );
        }
        let _session = client
            .session(tokio_stream::iter([hello(
                reply.worker_id,
                &reply.session_secret,
            )]))
            .await
            .unwrap();
        match loop_side.recv().await {
            Some(Event::Joined { worker, .. }) => assert_eq!(worker.0, reply.worker_id),
            other => panic!("expected the owner's arrival, got {other:?}"),
        }
        // The registration is used up: the same secret opens no second session.
        let refused = client
            .session(tokio_stream::iter([hello(
                reply.worker_id,
                &reply.session_secret,
            )]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    }

    #[tokio::test]
    async fn registrations_without_a_session_are_capped_and_expire() {
        let (events, _loop_side) = mpsc::unbounded_channel();
        let expiry = Duration::from_millis(500);
        let mut client = serve(service(events).expiring_after(expiry)).await;
        let first = client.register(registration()).await.unwrap().into_inner();
        for _ in 1..MAX_PENDING_REGISTRATIONS {
            client.register(registration()).await.unwrap();
        }
        let refused = client.register(registration()).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("256 registrations"),
            "{}",
            refused.message()
        );

        tokio::time::sleep(expiry).await;
        let refused = client
            .session(tokio_stream::iter([hello(
                first.worker_id,
                &first.session_secret,
            )]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
        assert!(
            refused.message().contains("expired"),
            "{}",
            refused.message()
        );
        assert!(client.register(registration()).await.is_ok());
    }

    #[test]
    fn free_text_in_reports_is_escaped_and_bounded_before_the_loop_sees_it() {
        let forged = format!("oops\n\u{1b}[2J{}", "x".repeat(20 << 20));
        let Report::Failure(message) = into_report(Some(Kind::Failure(proto::v1::Failure {
            message: forged.clone(),
        }))) else {
            panic!("not a failure");
        };
        assert!(
            message.starts_with("oops\\u{a}\\u{1b}[2J"),
            "{}",
            &message[..40]
        );
        assert!(
            message.len() < 2 * limits::MAX_TEXT_BYTES,
            "{}",
            message.len()
        );
        let Report::Gradient(g) = into_report(Some(Kind::Gradient(GradientReport {
            ring_error: forged.clone(),
            problem: forged,
            count: 7,
            ..Default::default()
        }))) else {
            panic!("not a gradient");
        };
        assert!(g.ring_error.len() < 2 * limits::MAX_TEXT_BYTES && !g.problem.contains('\n'));
        assert_eq!(g.count, 7);
    }

    /// A worker that arrives after the training loop has ended is told to leave in its
    /// session, instead of seeing the session close and registering again forever.
    #[tokio::test]
    async fn a_session_opened_after_the_job_ended_is_told_to_leave() {
        let (events, loop_side) = mpsc::unbounded_channel();
        drop(loop_side);
        let mut client = serve(service(events)).await;
        let reply = client.register(registration()).await.unwrap().into_inner();
        let hello = WorkerMessage {
            kind: Some(Kind::Hello(Hello {
                worker_id: reply.worker_id,
                session_secret: reply.session_secret,
            })),
        };
        let mut session = client
            .session(tokio_stream::iter([hello]))
            .await
            .unwrap()
            .into_inner();
        let first = session.message().await.unwrap().and_then(|m| m.kind);
        match first {
            Some(Command::Shutdown(shutdown)) => assert_eq!(shutdown.reason, "the job has ended"),
            other => panic!("expected a shutdown, got {other:?}"),
        }
        assert!(session.message().await.unwrap().is_none());
    }
}
