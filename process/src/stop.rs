//! How a process is asked to stop, and why: Ctrl-C and SIGTERM mean different things.

use tokio_util::sync::CancellationToken;

/// Why a process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Ctrl-C (SIGINT): someone at the terminal wants it to end.
    Interrupt,
    /// SIGTERM: what Kubernetes sends before it kills a pod (eviction, node drain, deletion).
    Terminate,
}

impl StopCause {
    /// The exit status of a process stopped this way, as a shell reports a process killed by
    /// the signal: 130 for SIGINT, 143 for SIGTERM.
    pub fn exit_status(self) -> u8 {
        match self {
            StopCause::Interrupt => 130,
            StopCause::Terminate => 143,
        }
    }
}

/// How a process is asked to stop: Ctrl-C and SIGTERM mean different things to a
/// coordinator (end the job, or step away from it and leave the workers waiting for the
/// coordinator that carries it on), so they are kept apart. `Stop::default()` is never
/// asked, until [`Stop::request`].
#[derive(Debug, Clone, Default)]
pub struct Stop {
    requested: CancellationToken,
    cause: std::sync::Arc<std::sync::OnceLock<StopCause>>,
}

impl Stop {
    /// Asks to stop; the first cause given is the one that counts.
    pub fn request(&self, cause: StopCause) {
        let _ = self.cause.set(cause);
        self.requested.cancel();
    }

    /// Why stopping was asked for, if it was.
    pub fn cause(&self) -> Option<StopCause> {
        self.cause.get().copied()
    }

    /// Waits until stopping is asked for; returns why.
    pub async fn requested(&self) -> StopCause {
        self.requested.cancelled().await;
        self.cause().unwrap_or(StopCause::Interrupt)
    }

    /// A token cancelled when stopping is asked for, whatever the cause.
    pub fn token(&self) -> CancellationToken {
        self.requested.clone()
    }
}

/// A [`Stop`] asked on Ctrl-C (SIGINT) or SIGTERM.
pub fn stop_on_signals() -> Stop {
    let stop = Stop::default();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        let cause = tokio::select! {
            _ = interrupt.recv() => StopCause::Interrupt,
            _ = terminate.recv() => StopCause::Terminate,
        };
        tracing::warn!(?cause, "signal received: shutting down");
        on_signal.request(cause);
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_cause_asked_is_the_one_that_counts() {
        let stop = Stop::default();
        assert_eq!(stop.cause(), None);
        assert!(!stop.token().is_cancelled());
        stop.request(StopCause::Terminate);
        stop.clone().request(StopCause::Interrupt);
        assert_eq!(stop.cause(), Some(StopCause::Terminate));
        assert_eq!(stop.requested().await, StopCause::Terminate);
        assert!(stop.token().is_cancelled());
        assert_eq!(StopCause::Terminate.exit_status(), 143);
        assert_eq!(StopCause::Interrupt.exit_status(), 130);
    }
}
