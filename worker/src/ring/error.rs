use common::ids::Rank;
use std::{fmt, io, net::SocketAddr, time::Duration};

/// A ring neighbour: its rank and the listener address it advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub rank: Rank,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.rank, self.addr)
    }
}

/// Where in the protocol something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forming the ring: dialling the right neighbour or accepting the left one.
    Handshake,
    /// Round `round` (of n-1) of the reduce-scatter half of allreduce `step`.
    ReduceScatter { step: u64, round: usize },
    /// Round `round` (of n-1) of the all-gather half of allreduce `step`.
    AllGather { step: u64, round: usize },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Handshake => f.write_str("the handshake"),
            Phase::ReduceScatter { step, round } => {
                write!(f, "reduce-scatter round {round} of step {step}")
            }
            Phase::AllGather { step, round } => {
                write!(f, "all-gather round {round} of step {step}")
            }
        }
    }
}

/// Which way the bytes were going when something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendingTo,
    ReceivingFrom,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::SendingTo => "sending to",
            Direction::ReceivingFrom => "receiving from",
        })
    }
}

/// Why a ring could not form or an allreduce failed.
///
/// After any error but [`RingError::Config`] the [`Ring`](super::Ring) is unusable: the
/// caller rebuilds it with a new generation (and usually a new membership).
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The configuration cannot describe a ring; retrying the same one will not help.
    #[error("invalid ring configuration: {0}")]
    Config(String),

    /// The right neighbour did not accept a handshake for this generation before the deadline.
    #[error(
        "could not connect to {peer} for generation {generation} within {timeout:?}: {last_error}"
    )]
    Connect {
        peer: Peer,
        generation: u64,
        timeout: Duration,
        /// The last reason a try failed (refused, closed during the handshake, ...).
        last_error: String,
    },

    /// No valid handshake from the left neighbour arrived before the deadline.
    #[error(
        "no connection from {peer} for generation {generation} within {timeout:?} \
         ({rejected} invalid connections refused)"
    )]
    Accept {
        peer: Peer,
        generation: u64,
        timeout: Duration,
        rejected: usize,
    },

    /// A neighbour agreed on generation and key but is not who the configuration says: the
    /// ranks disagree about the membership.
    #[error("{peer} answered the handshake wrongly: {reason}")]
    Handshake { peer: Peer, reason: String },

    /// A neighbour sent or accepted nothing for the whole timeout.
    #[error("timed out after {timeout:?} {direction} {peer} in {phase}")]
    Timeout {
        peer: Peer,
        direction: Direction,
        phase: Phase,
        timeout: Duration,
    },

    /// A neighbour closed its connection: its process died or it dropped its ring.
    #[error("{peer} closed the connection in {phase}")]
    Closed { peer: Peer, phase: Phase },

    /// Any other socket error.
    #[error("{direction} {peer} in {phase}: {source}")]
    Io {
        peer: Peer,
        direction: Direction,
        phase: Phase,
        #[source]
        source: io::Error,
    },

    /// The ranks called allreduce with buffers of different lengths: a bug in the caller.
    #[error("{peer} sent {theirs} floats for step {step}, this rank has {ours}")]
    LengthMismatch {
        peer: Peer,
        step: u64,
        theirs: u64,
        ours: u64,
    },

    /// A message that does not follow the protocol (wrong step, round or chunk).
    #[error("{peer} sent an unexpected message in {phase}: {reason}")]
    Protocol {
        peer: Peer,
        phase: Phase,
        reason: String,
    },

    /// An earlier error broke this ring.
    #[error("the ring broke earlier ({0}); rebuild it with a new generation")]
    Broken(String),
}

impl RingError {
    /// Whether rebuilding the ring (with a new generation) may help: lost or slow peers,
    /// yes; a configuration or length disagreement, which repeats itself, no.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            RingError::Config(_) | RingError::Handshake { .. } | RingError::LengthMismatch { .. }
        )
    }

    /// Classifies a socket error: timeouts and closed connections get variants of their own.
    pub(super) fn io(
        peer: Peer,
        direction: Direction,
        phase: Phase,
        timeout: Duration,
        source: io::Error,
    ) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RingError::Timeout {
                peer,
                direction,
                phase,
                timeout,
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => RingError::Closed { peer, phase },
            _ => RingError::Io {
                peer,
                direction,
                phase,
                source,
            },
        }
    }
}
