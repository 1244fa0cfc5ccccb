use super::error::RingError;
use common::ids::Rank;
use std::net::SocketAddr;
use std::time::Duration;

/// One generation of the ring, as the coordinator hands it to every member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingConfig {
    /// This worker's position; its neighbours are `rank - 1` (left, sends to it) and
    /// `rank + 1` (right, receives from it), modulo the ring size.
    pub rank: Rank,
    /// Every member's [`RingListener`](super::RingListener) address, in rank order.
    pub peers: Vec<SocketAddr>,
    /// Increases with every rebuild; connections made for another generation are refused.
    pub generation: u64,
    /// A random secret of this generation: a connection must present it. It keeps strays and
    /// confused peers out; it is sent in the clear, so it is no defence against an eavesdropper.
    pub key: [u8; 16],
    /// Bounds forming the ring and every blocking read or write afterwards. A rank waits this
    /// long for its neighbours to arrive at each allreduce, so it must exceed the longest
    /// skew between ranks (the slowest rank's compute time), not just a network round trip.
    pub timeout: Duration,
    /// The longest buffer, in floats, to sum through shared memory instead of TCP when every
    /// member can map rank 0's segment (they run on one host and share its `/dev/shm`); the
    /// segment takes 8n times this many bytes. 0 keeps the ring on TCP.
    pub shared_memory_floats: usize,
}

impl RingConfig {
    pub fn size(&self) -> usize {
        self.peers.len()
    }

    pub fn validate(&self) -> Result<(), RingError> {
        let n = self.peers.len();
        if n == 0 {
            return Err(RingError::Config("a ring needs at least one member".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(RingError::Config(format!("{n} members are too many")));
        }
        if self.rank.0 as usize >= n {
            return Err(RingError::Config(format!(
                "{} is not among the {n} members",
                self.rank
            )));
        }
        if self.timeout.is_zero() {
            return Err(RingError::Config("the timeout must be positive".into()));
        }
        Ok(())
    }
}
