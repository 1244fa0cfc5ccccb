use super::error::{Peer, RingError};
use super::wire::Hello;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How long an accepted connection may take to send its hello. A neighbour writes it right
/// after connecting, so this only bounds what a silent or hostile client costs the ring; a
/// neighbour that is refused because it was slow simply dials again.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest pause between looks at the (non-blocking) listener while waiting for a neighbour.
const MAX_POLL: Duration = Duration::from_millis(20);

/// The worker's ring endpoint, bound once at start-up and advertised to the coordinator; it
/// serves the rings of every later generation.
///
/// One ring forms through a listener at a time: [`Ring::connect`](super::Ring::connect)
/// accepts exactly one connection, from the left neighbour, and refuses the others it meets
/// (stale generations, wrong keys, strangers), which are closed without an answer.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Binds `addr` (port 0 picks a free port; see [`RingListener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        // Accepting polls, because std's accept has no timeout.
        listener.set_nonblocking(true)?;
        Ok(Self { listener })
    }

    /// The bound address, with the port the system chose.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts connections until one sends exactly `expected` (the left neighbour's hello for
    /// this generation), answers it with `reply` and returns it. Every other connection is
    /// closed and the wait goes on until `deadline`.
    pub(super) fn accept_left(
        &self,
        peer: Peer,
        expected: &Hello,
        reply: &Hello,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<TcpStream, RingError> {
        let mut rejected = 0;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    match answer(stream, expected, reply, deadline) {
                        Ok(stream) => return Ok(stream),
                        Err(Refusal { reason, routine }) => {
                            rejected += 1;
                            if routine {
                                debug!(%from, %reason, "refused a ring connection");
                            } else {
                                warn!(%from, %reason, "refused a ring connection");
                            }
                        }
                    }
                    pause = Duration::from_millis(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(RingError::Accept {
                            peer,
                            generation: expected.generation,
                            timeout,
                            rejected,
                        });
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(MAX_POLL);
                }
                // Errors of one connection (aborted before accept, out of descriptors for a
                // moment) must not end the wait for the right one.
                Err(e) => {
                    debug!(error = %e, "accepting a ring connection failed");
                    std::thread::sleep(pause);
                }
            }
        }
    }
}

/// Why a connection was closed unanswered.
struct Refusal {
    reason: String,
    /// A neighbour still in an older generation, or already in a newer one: expected while
    /// the members rebuild at slightly different times, so not worth a warning.
    routine: bool,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal {
            reason,
            routine: false,
        }
    }
}

/// Reads and checks a client's hello, answering with `reply` when it is `expected`.
fn answer(
    mut stream: TcpStream,
    expected: &Hello,
    reply: &Hello,
    deadline: Instant,
) -> Result<TcpStream, Refusal> {
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), HELLO_TIMEOUT);
    let mut bytes = [0; Hello::LEN];
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(wait)))
        .and_then(|()| stream.set_write_timeout(Some(wait)))
        .and_then(|()| stream.read_exact(&mut bytes))
        .map_err(|e| format!("no hello: {e}"))?;
    let hello = Hello::decode(&bytes).ok_or_else(|| "not a ring hello (bad magic)".to_owned())?;
    if let Some(reason) = hello.mismatch(expected) {
        let routine = hello.generation != expected.generation;
        return Err(Refusal { reason, routine });
    }
    stream
        .write_all(&reply.encode())
        .map_err(|e| format!("answering the hello: {e}"))?;
    Ok(stream)
}
