//! A plaintext health port for probes.
//!
//! Kubernetes' `grpc` probes, like `grpc_health_probe` without flags, send no TLS and no
//! metadata, so they cannot call a port that requires either. Coordinator and worker can serve
//! the standard `grpc.health.v1` service on a port of its own (`--health-listen`), with nothing
//! else on it: no job data, no token, nothing a caller can change.
//!
//! Two questions are answered there, as two service names:
//! - [`READINESS`] (`""`, what a probe without `service` asks): whether the process is doing its
//!   job: for the coordinator, that it accepts workers (the dataset is loaded and the job has not
//!   ended).
//! - [`LIVENESS`] (`"liveness"`): whether the process is making progress. Its loop calls
//!   [`Liveness::beat`] whenever it turns, also while it waits; a loop that has not turned for
//!   [`STUCK_AFTER`] is stuck, and only then is the answer `NOT_SERVING`. Waiting for a
//!   coordinator or for workers, however long, is progress. A process whose runtime no longer
//!   runs does not answer at all, which a probe also counts as a failure.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// The service name a probe asks for readiness; empty, as probes without `service` send.
pub const READINESS: &str = "";

/// The service name a probe asks for liveness.
pub const LIVENESS: &str = "liveness";

/// How long a loop may go without turning before it counts as stuck. Every wait in the
/// coordinator's loop and every idle wait of a worker turns it at least once a second; the
/// longest single piece of work (a worker evaluating its share of the test set, a checkpoint
/// written to a slow volume) takes seconds.
pub const STUCK_AFTER: Duration = Duration::from_secs(120);

/// How often the answers are brought up to date.
const REFRESH: Duration = Duration::from_millis(500);

/// Whether a process's loop is making progress; cheap to clone and to beat.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<LivenessInner>,
}

#[derive(Debug)]
struct LivenessInner {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last_beat: AtomicU64,
    stuck_after: Duration,
}

impl Liveness {
    /// A loop that counts as stuck after `stuck_after` without a beat; it has just beaten.
    pub fn new(stuck_after: Duration) -> Self {
        Liveness {
            inner: Arc::new(LivenessInner {
                origin: Instant::now(),
                last_beat: AtomicU64::new(0),
                stuck_after,
            }),
        }
    }

    /// The loop turned.
    pub fn beat(&self) {
        let now = self.inner.origin.elapsed().as_millis() as u64;
        self.inner.last_beat.fetch_max(now, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_beat.load(Ordering::Relaxed));
        self.inner.origin.elapsed().saturating_sub(last)
    }

    /// Whether the loop has turned within its bound.
    pub fn is_alive(&self) -> bool {
        self.since_last_beat() <= self.inner.stuck_after
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new(STUCK_AFTER)
    }
}

/// Whether a process is ready; set by its owner, read by the health port.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Ready from now on (`true`) or no longer (`false`).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A running health port.
pub struct HealthPort {
    pub addr: SocketAddr,
    server: JoinHandle<()>,
    stop: CancellationToken,
}

impl HealthPort {
    /// Serves `grpc.health.v1` on `listener` in plaintext: [`READINESS`] from `readiness`,
    /// [`LIVENESS`] from `liveness`, brought up to date twice a second, until
    /// [`HealthPort::stop`].
    pub fn spawn(listener: TcpListener, readiness: Readiness, liveness: Liveness) -> HealthPort {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let stop = CancellationToken::new();
        let (reporter, service) = tonic_health::server::health_reporter();
        let status = |up: bool| {
            if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let first = reporter.clone();
        let (first_readiness, first_liveness) = (readiness.clone(), liveness.clone());
        let refresh_stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = refresh_stop.cancelled() => return,
                }
                reporter
                    .set_service_status(READINESS, status(readiness.is_ready()))
                    .await;
                reporter
                    .set_service_status(LIVENESS, status(liveness.is_alive()))
                    .await;
            }
        });
        let server_stop = stop.clone();
        let server = tokio::spawn(async move {
            // Both services are known before the first probe is answered: one that came
            // before the first refresh would otherwise find "service not registered".
            first
                .set_service_status(READINESS, status(first_readiness.is_ready()))
                .await;
            first
                .set_service_status(LIVENESS, status(first_liveness.is_alive()))
                .await;
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    server_stop.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::warn!("health port {addr}: {e}");
            }
        });
        tracing::info!(%addr, "serving health probes (grpc.health.v1, plaintext)");
        HealthPort { addr, server, stop }
    }

    /// Stops serving; probes from now on find the port closed.
    pub async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(1), self.server)
            .await
            .is_err()
        {
            tracing::debug!("health port: connections still open after 1 s; dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    /// Asks `service` until it answers `expected`, for up to 10 s; the last answer.
    async fn answers(addr: SocketAddr, service: &str, expected: ServingStatus) -> i32 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = client
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if status == expected as i32 || Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn the_port_answers_readiness_and_liveness_as_they_are_set() {
        use ServingStatus::{NotServing, Serving};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let readiness = Readiness::default();
        let liveness = Liveness::new(Duration::from_secs(1));
        let port = HealthPort::spawn(listener, readiness.clone(), liveness.clone());
        assert_eq!(answers(port.addr, LIVENESS, Serving).await, Serving as i32);
        assert_eq!(
            answers(port.addr, READINESS, NotServing).await,
            NotServing as i32
        );

        readiness.set(true);
        assert_eq!(answers(port.addr, READINESS, Serving).await, Serving as i32);
        // A loop that stops beating is reported stuck once its bound has passed, and alive
        // again when it turns.
        assert_eq!(
            answers(port.addr, LIVENESS, NotServing).await,
            NotServing as i32
        );
        assert!(liveness.since_last_beat() >= Duration::from_secs(1));
        liveness.beat();
        assert_eq!(answers(port.addr, LIVENESS, Serving).await, Serving as i32);
        port.stop().await;
    }

    #[test]
    fn a_loop_that_just_beat_is_alive() {
        let liveness = Liveness::new(Duration::from_secs(60));
        liveness.beat();
        assert!(liveness.since_last_beat() < Duration::from_secs(1));
        assert!(liveness.is_alive());
    }
}
