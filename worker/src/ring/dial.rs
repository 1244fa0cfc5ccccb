//! Connecting to the right neighbour, trying again until it accepts or the deadline passes.

use super::error::{Peer, RingError};
use super::wire::Hello;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Longest pause between tries.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Connects to `peer`, sends `hello` and waits for its answer, which must be `expected`.
///
/// A neighbour that is not listening yet refuses the connection; one still forming an older
/// generation's ring closes it without answering. Both are retried: the neighbour gets there
/// when its caller learns of the new membership. A neighbour that answers as someone else is
/// a disagreement about the membership and fails at once.
pub(super) fn dial_right(
    peer: Peer,
    hello: &Hello,
    expected: &Hello,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, RingError> {
    let mut backoff = Duration::from_millis(1);
    loop {
        let last_error = match try_dial(peer, hello, deadline) {
            Ok((stream, answer)) => match answer.mismatch(expected) {
                None => return Ok(stream),
                Some(reason) => return Err(RingError::Handshake { peer, reason }),
            },
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(RingError::Connect {
                peer,
                generation: hello.generation,
                timeout,
                last_error,
            });
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn try_dial(peer: Peer, hello: &Hello, deadline: Instant) -> Result<(TcpStream, Hello), String> {
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut stream =
        TcpStream::connect_timeout(&peer.addr, remaining()).map_err(|e| e.to_string())?;
    let mut answer = [0; Hello::LEN];
    stream
        .set_write_timeout(Some(remaining()))
        .and_then(|()| stream.write_all(&hello.encode()))
        .and_then(|()| stream.set_read_timeout(Some(remaining())))
        .and_then(|()| stream.read_exact(&mut answer))
        .map_err(|e| format!("handshake: {e}"))?;
    Hello::decode(&answer)
        .map(|answer| (stream, answer))
        .ok_or_else(|| "answer is not a ring hello".to_owned())
}
