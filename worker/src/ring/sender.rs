//! The thread that writes to the right neighbour while the caller's thread reads from the left.
//!
//! Sending and receiving must run at once: if a rank wrote a whole segment before reading,
//! every rank could block in write with full socket buffers and none would read. The thread
//! lives as long as the [`Ring`](super::Ring), so an allreduce spawns nothing.

use super::wire::{Frame, FrameHeader};
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the thread reports for each frame, in order.
pub(super) enum Sent {
    /// Written; the frame comes back for reuse.
    Done { frame: Frame, elapsed: Duration },
    /// Writing failed; the thread has stopped and shut down the left connection, so that a
    /// receive blocked on it returns at once instead of after the timeout.
    Failed {
        header: FrameHeader,
        error: io::Error,
    },
}

pub(super) struct Sender {
    queue: Option<mpsc::Sender<Frame>>,
    sent: mpsc::Receiver<Sent>,
    right: TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    /// Starts the thread writing to `right`; `left` is only shut down, should a write fail.
    pub fn spawn(right: &TcpStream, left: &TcpStream) -> io::Result<Sender> {
        let (queue, frames) = mpsc::channel::<Frame>();
        let (report, sent) = mpsc::channel();
        let mut stream = right.try_clone()?;
        let left = left.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("ring-sender".to_owned())
            .spawn(move || {
                for frame in frames {
                    let started = Instant::now();
                    let outcome = match stream.write_all(frame.bytes()) {
                        Ok(()) => Sent::Done {
                            frame,
                            elapsed: started.elapsed(),
                        },
                        Err(error) => {
                            let header = frame.header();
                            // Report before waking the receiver, so that it finds the cause.
                            let _ = report.send(Sent::Failed { header, error });
                            let _ = left.shutdown(Shutdown::Both);
                            return;
                        }
                    };
                    if report.send(outcome).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Sender {
            queue: Some(queue),
            sent,
            right: right.try_clone()?,
            thread: Some(thread),
        })
    }

    /// Queues `frame`; never blocks. A frame queued after the thread stopped is dropped: the
    /// failure that stopped it is waiting in [`Sender::try_sent`].
    pub fn push(&self, frame: Frame) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(frame);
        }
    }

    /// The next report, if one is ready.
    pub fn try_sent(&self) -> Option<Sent> {
        self.sent.try_recv().ok()
    }

    /// The next report, waiting for it; `None` if the thread has stopped. Writes time out,
    /// so this wait is bounded.
    pub fn wait_sent(&self) -> Option<Sent> {
        self.sent.recv().ok()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // Ends the thread's loop, and a write blocked on a stalled neighbour.
        self.queue = None;
        let _ = self.right.shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
