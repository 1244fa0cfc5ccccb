//! Ring allreduce among the workers over plain TCP: each worker sums its gradient with every
//! other worker's without the coordinator in the data path.
//!
//! # Algorithm
//! The n members form a ring in rank order; each sends only to its right neighbour
//! (`rank + 1`) and receives only from its left (`rank - 1`). The buffer is cut into n
//! segments ([`segments`]). In the 2(n-1) rounds, rank r sends segment `r - j` and receives
//! segment `r - j - 1` (mod n). The first n-1 rounds reduce-scatter: the received segment is
//! added to the local one, so after them rank r holds the full sum of segment `r + 1`. The
//! last n-1 rounds all-gather: received segments are copied, so every rank ends with the same
//! bits. Each rank moves 2(n-1)/n of the buffer each way, whatever n is.
//!
//! Segments travel in chunks of [`CHUNK_FLOATS`]. A received chunk is reduced in its own
//! buffer and queued at once for the next round, so reducing overlaps the transfer and the
//! rounds pipeline; a sender thread per ring writes while the caller's thread reads.
//!
//! # Shared memory
//! When every member can map one segment of shared memory (they run on one host), buffers up
//! to [`RingConfig::shared_memory_floats`] are summed there instead ([`shm`]): each rank sums
//! its segment straight from the others' buffers, in the same order as below, so the bits do
//! not depend on the transport. The TCP connections stay: they carry the negotiation, show
//! when a neighbour dies, and carry any longer buffer.
//!
//! # Determinism
//! Each element of segment s is summed in ring order starting at rank s:
//! `((x_s + x_{s+1}) + x_{s+2}) + ...`, as f32. For the same inputs and ring size the result is
//! the same on every run and every rank; it differs in the last bits from a sum in another
//! order (a parameter server's, or this ring's at another size).
//!
//! # Wire format
//! All little-endian. A connection starts with a 44-byte hello each way ([`wire::Hello`]):
//! magic `LSTPRING`, version u32, generation u64, sender rank u32, ring size u32, key 16 bytes.
//! The dialler (the left neighbour) speaks first; the listener answers only if everything
//! matches, else it closes the connection and waits for another. Then an [`wire::Offer`]
//! goes round the ring from rank 0 (usable flag, then a length-prefixed text: the segment's
//! path or why not) and round again to rank n-1 with the outcome. Then the dialler sends
//! frames: a 32-byte header ([`wire::FrameHeader`]: step u64, total floats u64, chunk offset
//! u64, round u32, count u32) and `count` f32. Every round sends at least one frame, even for
//! an empty segment, so a length disagreement is reported by the first header.
//!
//! # Failures
//! Every read and write has the config's timeout; forming the ring has it as deadline. The
//! first error shuts both connections down, so the neighbours fail at once rather than
//! after their own timeouts, and the ring stays broken: the caller builds a new one with a
//! new generation through the same [`RingListener`].

mod config;
mod dial;
mod error;
mod listener;
mod segments;
mod sender;
mod shm;
mod wire;

pub use config::RingConfig;
pub use error::{Direction, Peer, Phase, RingError};
pub use listener::RingListener;

use common::ids::Rank;
use segments::{chunks, segment};
use sender::{Sender, Sent};
use shm::SharedRing;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use wire::{Frame, FrameHeader, Hello, Offer, VERSION};

/// Floats per frame: 256 KiB. Small enough that a chunk is reduced and forwarded while the
/// next arrives; large enough that per-frame costs (a header, a wake-up of the sender thread)
/// vanish. `cargo bench -p worker --bench allreduce` on the 2-core development machine, shared
/// with other jobs, medians of 431,080 floats over three alternating runs: 16, 32, 64 and 128
/// Ki floats took 0.66-0.84, 1.00-1.09, 0.71-1.01 and 0.95-1.15 ms at 2 ranks and 3.33-3.37,
/// 3.21-3.55, 2.96-3.10 and 3.48-3.51 ms at 4 ranks.
pub const CHUNK_FLOATS: usize = 64 * 1024;

/// One generation's ring, from this worker's seat.
pub struct Ring {
    rank: usize,
    size: usize,
    state: State,
    transport: Transport,
}

enum State {
    /// A ring of one: the sum is the buffer itself.
    Alone,
    Linked(Box<Links>),
    /// Failed earlier with this error; its connections are closed.
    Broken(String),
}

/// How a ring sums its members' buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A ring of one: nothing to sum.
    Alone,
    /// Through one segment of shared memory, for buffers up to this many floats; TCP beyond.
    SharedMemory { floats: usize },
    /// Over the TCP connections, and why not through shared memory.
    Tcp { why_not_shared: String },
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Alone => f.write_str("no transport (a ring of one)"),
            Transport::SharedMemory { floats } => {
                write!(f, "shared memory (up to {floats} floats)")
            }
            Transport::Tcp { why_not_shared } => {
                write!(f, "TCP (no shared memory: {why_not_shared})")
            }
        }
    }
}

/// The two connections of a ring of two or more.
struct Links {
    rank: usize,
    size: usize,
    timeout: Duration,
    left_peer: Peer,
    right_peer: Peer,
    /// Receives frames from the left neighbour; the right connection belongs to `sender`.
    left: TcpStream,
    /// A handle on the right connection, to notice the neighbour closing it.
    right: TcpStream,
    sender: Sender,
    /// Every member's address, to name members in errors of the shared-memory transport.
    peers: Vec<SocketAddr>,
    /// The segment when every member mapped it.
    shared: Option<SharedRing>,
    /// Frames back from the sender thread, reused by the next reads and sends.
    pool: Vec<Frame>,
}

/// Where one allreduce spent its time, as seen from one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingTimings {
    /// The whole call.
    pub total: Duration,
    /// The caller's thread blocked reading from the left: waiting for data and copying it in.
    /// In shared memory: waiting in the barriers for the other members.
    pub receive: Duration,
    /// Adding received chunks, copying reduced ones and encoding this rank's own segment. In
    /// shared memory: copying in, summing this rank's segment and copying the others' out.
    pub reduce: Duration,
    /// The sender thread in writes to the right (concurrent with the two above).
    pub send: Duration,
    /// At the end, waiting for the sender thread to finish writing.
    pub drain: Duration,
    /// Bytes written to the right, headers included: 2(n-1)/n of the buffer, plus headers.
    pub bytes_sent: u64,
    /// Bytes read from the left, headers included; the same amount.
    pub bytes_received: u64,
}

impl Ring {
    /// Connects to the right neighbour and accepts the left one through `listener`, both
    /// within `config.timeout`. A ring of one needs no sockets.
    pub fn connect(listener: &RingListener, config: &RingConfig) -> Result<Ring, RingError> {
        config.validate()?;
        let size = config.size();
        let rank = config.rank.0 as usize;
        if size == 1 {
            return Ok(Ring {
                rank,
                size,
                state: State::Alone,
                transport: Transport::Alone,
            });
        }
        let hello_of = |rank: usize| Hello {
            version: VERSION,
            generation: config.generation,
            rank: rank as u32,
            size: size as u32,
            key: config.key,
        };
        let peer = |rank: usize| Peer {
            rank: Rank(rank as u32),
            addr: config.peers[rank],
        };
        let (left_rank, right_rank) = ((rank + size - 1) % size, (rank + 1) % size);
        let (left_peer, right_peer) = (peer(left_rank), peer(right_rank));
        let deadline = Instant::now() + config.timeout;
        // Both at once: every rank dials before it accepts, and a dialler waits for the answer.
        let (right, left) = std::thread::scope(|scope| {
            let dialling = scope.spawn(|| {
                dial::dial_right(
                    right_peer,
                    &hello_of(rank),
                    &hello_of(right_rank),
                    deadline,
                    config.timeout,
                )
            });
            let left = listener.accept_left(
                left_peer,
                &hello_of(left_rank),
                &hello_of(rank),
                deadline,
                config.timeout,
            );
            let right = dialling
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Ok::<_, RingError>((right?, left?))
        })?;
        let setup = |peer, direction| {
            move |source| RingError::Io {
                peer,
                direction,
                phase: Phase::Handshake,
                source,
            }
        };
        for (stream, peer, direction) in [
            (&right, right_peer, Direction::SendingTo),
            (&left, left_peer, Direction::ReceivingFrom),
        ] {
            stream
                .set_nodelay(true)
                .and_then(|()| stream.set_read_timeout(Some(config.timeout)))
                .and_then(|()| stream.set_write_timeout(Some(config.timeout)))
                .map_err(setup(peer, direction))?;
        }
        let (shared, transport) = negotiate(config, &right, &left, left_peer, right_peer)?;
        let sender =
            Sender::spawn(&right, &left).map_err(setup(right_peer, Direction::SendingTo))?;
        Ok(Ring {
            rank,
            size,
            transport,
            state: State::Linked(Box::new(Links {
                rank,
                size,
                timeout: config.timeout,
                left_peer,
                right_peer,
                left,
                right,
                sender,
                peers: config.peers.clone(),
                shared,
                pool: Vec::new(),
            })),
        })
    }

    /// How this ring sums: what the members settled on when it formed.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Sums `data` elementwise across all ranks, in place; every rank ends with the same bits.
    /// All ranks must call it with the same `step` and length. After an error the ring is
    /// broken and every later call fails with [`RingError::Broken`].
    pub fn allreduce_sum(&mut self, step: u64, data: &mut [f32]) -> Result<RingTimings, RingError> {
        let started = Instant::now();
        let result = match &mut self.state {
            State::Alone => Ok(RingTimings::default()),
            State::Broken(reason) => return Err(RingError::Broken(reason.clone())),
            State::Linked(links) => links.allreduce(step, data),
        };
        match result {
            Ok(timings) => Ok(RingTimings {
                total: started.elapsed(),
                ..timings
            }),
            Err(e) => {
                // Dropping the links closes both connections and stops the sender thread.
                self.state = State::Broken(e.to_string());
                Err(e)
            }
        }
    }

    /// This worker's rank in the ring.
    pub fn rank(&self) -> Rank {
        Rank(self.rank as u32)
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// Settles the transport: rank 0 makes a segment and offers it round the ring, each member
/// maps it or says why not, and the outcome goes round once more. Returns this member's
/// segment if all of them mapped it.
fn negotiate(
    config: &RingConfig,
    right: &TcpStream,
    left: &TcpStream,
    left_peer: Peer,
    right_peer: Peer,
) -> Result<(Option<SharedRing>, Transport), RingError> {
    let (rank, size) = (config.rank.0 as usize, config.size());
    let send = |offer: &Offer| {
        (&*right).write_all(&offer.encode()).map_err(|e| {
            RingError::io(
                right_peer,
                Direction::SendingTo,
                Phase::Handshake,
                config.timeout,
                e,
            )
        })
    };
    let receive = || {
        let mut bytes = [0; Offer::LEN];
        (&*left).read_exact(&mut bytes).map_err(|e| {
            RingError::io(
                left_peer,
                Direction::ReceivingFrom,
                Phase::Handshake,
                config.timeout,
                e,
            )
        })?;
        Offer::decode(&bytes).map_err(|reason| RingError::Protocol {
            peer: left_peer,
            phase: Phase::Handshake,
            reason,
        })
    };
    let refused = |why: String| Offer {
        usable: false,
        text: format!("rank {rank}: {why}"),
    };
    let mut segment = None;
    // Rank 0 starts the offer; the others take it from the left, add their answer and pass
    // it on. Once one member has refused, the offer stays refused, with its reason.
    let received = if rank == 0 { None } else { Some(receive()?) };
    let offer = match received {
        Some(offer) if !offer.usable => offer,
        _ if config.shared_memory_floats == 0 => refused("shared memory is turned off".into()),
        None => SharedRing::create(
            Path::new(shm::SHM_DIR),
            config.generation,
            &config.key,
            size,
            config.shared_memory_floats,
        )
        .and_then(|made| {
            let path = made.path().and_then(Path::to_str).map(str::to_owned);
            segment = Some(made);
            path.filter(|path| path.len() <= Offer::LEN - 2)
                .ok_or_else(|| "the segment's path does not fit an offer".into())
        })
        .map_or_else(refused, |path| Offer {
            usable: true,
            text: path,
        }),
        Some(offer) => {
            let path = Path::new(&offer.text);
            match SharedRing::open(path, config.generation, &config.key, rank, size) {
                Ok(opened) => {
                    segment = Some(opened);
                    offer
                }
                Err(why) => refused(why),
            }
        }
    };
    send(&offer)?;
    let outcome = if rank == 0 {
        let outcome = receive()?;
        send(&outcome)?;
        outcome
    } else {
        let outcome = receive()?;
        if rank + 1 < size {
            send(&outcome)?;
        }
        outcome
    };
    Ok(match segment {
        Some(mut segment) if outcome.usable => {
            // Every member has the segment mapped by now: its name can go.
            segment.unlink();
            let floats = segment.capacity();
            (Some(segment), Transport::SharedMemory { floats })
        }
        _ => (
            None,
            Transport::Tcp {
                why_not_shared: outcome.text,
            },
        ),
    })
}

/// A ring's view of its members while it waits in a shared-memory barrier.
struct Neighbours<'a> {
    rank: usize,
    left: &'a TcpStream,
    right: &'a TcpStream,
    peers: &'a [SocketAddr],
    timeout: Duration,
}

impl shm::Watch for Neighbours<'_> {
    fn check(&mut self, phase: Phase) -> Result<(), RingError> {
        let n = self.peers.len();
        for (stream, rank, direction) in [
            (self.left, (self.rank + n - 1) % n, Direction::ReceivingFrom),
            (self.right, (self.rank + 1) % n, Direction::SendingTo),
        ] {
            let peer = self.peer(rank);
            match peek(stream) {
                Ok(None) => {}
                Ok(Some(0)) => return Err(RingError::Closed { peer, phase }),
                Ok(Some(_)) => {
                    return Err(RingError::Protocol {
                        peer,
                        phase,
                        reason: "data over TCP while this rank sums in shared memory \
                                 (do the ranks' buffer lengths differ?)"
                            .into(),
                    });
                }
                Err(e) => return Err(RingError::io(peer, direction, phase, self.timeout, e)),
            }
        }
        Ok(())
    }

    fn peer(&self, rank: usize) -> Peer {
        Peer {
            rank: Rank(rank as u32),
            addr: self.peers[rank],
        }
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Without blocking: `None` if nothing has arrived, `Some(0)` if the peer closed the
/// connection, `Some(n)` if bytes are waiting.
fn peek(stream: &TcpStream) -> std::io::Result<Option<usize>> {
    stream.set_nonblocking(true)?;
    let result = stream.peek(&mut [0; 1]);
    stream.set_nonblocking(false)?;
    match result {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

impl Links {
    fn allreduce(&mut self, step: u64, data: &mut [f32]) -> Result<RingTimings, RingError> {
        if let Some(shared) = self.shared.as_mut().filter(|s| data.len() <= s.capacity()) {
            let mut watch = Neighbours {
                rank: self.rank,
                left: &self.left,
                right: &self.right,
                peers: &self.peers,
                timeout: self.timeout,
            };
            let (waited, worked) = shared.allreduce(step, data, &mut watch)?;
            return Ok(RingTimings {
                receive: waited,
                reduce: worked,
                ..RingTimings::default()
            });
        }
        self.allreduce_tcp(step, data)
    }

    fn allreduce_tcp(&mut self, step: u64, data: &mut [f32]) -> Result<RingTimings, RingError> {
        let (rank, n) = (self.rank, self.size);
        let mut timings = RingTimings::default();
        let total = data.len() as u64;
        let rounds = 2 * (n - 1);
        let header = |round: usize, chunk: &std::ops::Range<usize>| FrameHeader {
            step,
            total,
            offset: chunk.start as u64,
            round: round as u32,
            count: chunk.len() as u32,
        };
        let mut in_flight = 0;

        let started = Instant::now();
        for chunk in chunks(segment(data.len(), n, rank), CHUNK_FLOATS) {
            let mut frame = self.pool.pop().unwrap_or_default();
            frame.reset(chunk.len());
            frame.set_header(&header(0, &chunk));
            encode(&data[chunk], frame.payload_mut());
            timings.bytes_sent += frame.bytes().len() as u64;
            self.sender.push(frame);
            in_flight += 1;
        }
        timings.reduce += started.elapsed();

        for round in 0..rounds {
            let phase = phase(step, round, n);
            // Rank r receives segment r - round - 1 (mod n); the offset keeps it non-negative.
            let received = segment(data.len(), n, (rank + 2 * n - 1 - round) % n);
            for chunk in chunks(received, CHUNK_FLOATS) {
                self.reclaim(&mut timings, &mut in_flight, phase)?;
                let mut frame = self.pool.pop().unwrap_or_default();
                frame.reset(chunk.len());
                let started = Instant::now();
                self.receive(&mut frame, &header(round, &chunk), phase)?;
                timings.receive += started.elapsed();
                timings.bytes_received += frame.bytes().len() as u64;

                let started = Instant::now();
                if round < n - 1 {
                    add_into(&mut data[chunk.clone()], frame.payload_mut());
                } else {
                    decode(frame.payload(), &mut data[chunk.clone()]);
                }
                timings.reduce += started.elapsed();
                if round + 1 < rounds {
                    frame.set_header(&header(round + 1, &chunk));
                    timings.bytes_sent += frame.bytes().len() as u64;
                    self.sender.push(frame);
                    in_flight += 1;
                } else {
                    self.pool.push(frame);
                }
            }
        }

        let started = Instant::now();
        let last = phase(step, rounds - 1, n);
        while in_flight > 0 {
            let sent = self.sender.wait_sent();
            self.settle(sent, &mut timings, &mut in_flight, last)?;
        }
        timings.drain = started.elapsed();
        Ok(timings)
    }

    /// Takes back the frames the sender thread has written; fails if a write failed.
    fn reclaim(
        &mut self,
        timings: &mut RingTimings,
        in_flight: &mut usize,
        phase: Phase,
    ) -> Result<(), RingError> {
        while let Some(sent) = self.sender.try_sent() {
            self.settle(Some(sent), timings, in_flight, phase)?;
        }
        Ok(())
    }

    fn settle(
        &mut self,
        sent: Option<Sent>,
        timings: &mut RingTimings,
        in_flight: &mut usize,
        phase: Phase,
    ) -> Result<(), RingError> {
        match sent {
            Some(Sent::Done { frame, elapsed }) => {
                timings.send += elapsed;
                *in_flight -= 1;
                self.pool.push(frame);
                Ok(())
            }
            Some(Sent::Failed { header, error }) => Err(self.send_error(header, error)),
            // The thread only stops after reporting a failure, which was consumed above.
            None => Err(RingError::Closed {
                peer: self.right_peer,
                phase,
            }),
        }
    }

    fn send_error(&self, header: FrameHeader, error: std::io::Error) -> RingError {
        let phase = phase(header.step, header.round as usize, self.size);
        RingError::io(
            self.right_peer,
            Direction::SendingTo,
            phase,
            self.timeout,
            error,
        )
    }

    /// Reads the frame `expected` from the left neighbour into `frame`.
    fn receive(
        &mut self,
        frame: &mut Frame,
        expected: &FrameHeader,
        phase: Phase,
    ) -> Result<(), RingError> {
        let peer = self.left_peer;
        let read_error = |links: &Self, e| {
            // A failed write wakes this read by shutting the connection down: report the cause.
            // Reports before the failure are of written frames and need no settling now.
            while let Some(sent) = links.sender.try_sent() {
                if let Sent::Failed { header, error } = sent {
                    return links.send_error(header, error);
                }
            }
            RingError::io(peer, Direction::ReceivingFrom, phase, links.timeout, e)
        };
        if let Err(e) = self.left.read_exact(frame.header_bytes_mut()) {
            return Err(read_error(self, e));
        }
        let got = frame.header();
        if got.step != expected.step {
            return Err(RingError::Protocol {
                peer,
                phase,
                reason: format!("a frame of step {}", got.step),
            });
        }
        if got.total != expected.total {
            return Err(RingError::LengthMismatch {
                peer,
                step: expected.step,
                theirs: got.total,
                ours: expected.total,
            });
        }
        if got != *expected {
            return Err(RingError::Protocol {
                peer,
                phase,
                reason: format!(
                    "round {} floats {}+{}, expected round {} floats {}+{}",
                    got.round,
                    got.offset,
                    got.count,
                    expected.round,
                    expected.offset,
                    expected.count
                ),
            });
        }
        if let Err(e) = self.left.read_exact(frame.payload_mut()) {
            return Err(read_error(self, e));
        }
        Ok(())
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        // The sender's own drop closes the right connection.
        let _ = self.left.shutdown(Shutdown::Both);
    }
}

fn phase(step: u64, round: usize, n: usize) -> Phase {
    if round < n - 1 {
        Phase::ReduceScatter { step, round }
    } else {
        Phase::AllGather {
            step,
            round: round - (n - 1),
        }
    }
}

/// `data` as little-endian bytes into `out`.
fn encode(data: &[f32], out: &mut [u8]) {
    for (x, bytes) in data.iter().zip(out.chunks_exact_mut(4)) {
        bytes.copy_from_slice(&x.to_le_bytes());
    }
}

/// Little-endian bytes into `data`.
fn decode(bytes: &[u8], data: &mut [f32]) {
    for (x, bytes) in data.iter_mut().zip(bytes.chunks_exact(4)) {
        *x = f32::from_le_bytes(bytes.try_into().expect("4 bytes"));
    }
}

/// Adds the received partial sums to `data`, left operand first (see "Determinism"), and
/// leaves the sums in both: `data` keeps them, `bytes` carries them on to the right.
fn add_into(data: &mut [f32], bytes: &mut [u8]) {
    for (x, bytes) in data.iter_mut().zip(bytes.chunks_exact_mut(4)) {
        let sum = f32::from_le_bytes((&*bytes).try_into().expect("4 bytes")) + *x;
        *x = sum;
        bytes.copy_from_slice(&sum.to_le_bytes());
    }
}

#[cfg(test)]
mod tests;
