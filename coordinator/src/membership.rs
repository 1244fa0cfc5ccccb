//! Who takes part in the job: the members in rank order, and the workers waiting to be
//! admitted at the next step boundary.

use crate::event::Outbox;
use common::ids::WorkerId;
use proto::v1::{CoordinatorMessage, Evicted, Shutdown, ShutdownCause, coordinator_message::Kind};
use std::time::Instant;
use tokio::sync::mpsc;

/// A worker with an open session.
pub struct Member {
    pub id: WorkerId,
    outbox: Outbox,
    /// Where its ring listener is reached, when it has one.
    pub ring_address: Option<String>,
    /// When the coordinator last heard anything from it (a heartbeat or an answer).
    pub last_heard: Instant,
}

/// The members, whose rank is their index, and the workers waiting to join them.
pub struct Membership {
    members: Vec<Member>,
    waiting: Vec<Member>,
    max: usize,
}

/// What became of a worker that opened a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// It waits for the next step boundary.
    Waiting,
    /// The job already has `--max-workers` workers.
    TurnedAway,
}

impl Membership {
    /// No members; at most `max` at once.
    pub fn new(max: usize) -> Self {
        Membership {
            members: Vec::new(),
            waiting: Vec::new(),
            max,
        }
    }

    /// The members' ids in rank order.
    pub fn ids(&self) -> Vec<WorkerId> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether `worker` is a member.
    pub fn contains(&self, worker: WorkerId) -> bool {
        self.members.iter().any(|m| m.id == worker)
    }

    /// A member by id.
    pub fn member(&self, worker: WorkerId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == worker)
    }

    /// Queues a worker whose session just opened, unless the job is full.
    pub fn arrive(
        &mut self,
        id: WorkerId,
        outbox: Outbox,
        ring_address: Option<String>,
    ) -> Arrival {
        if self.members.len() + self.waiting.len() >= self.max {
            let reason = format!("the job already has its {} workers", self.max);
            let _ = outbox.try_send(Ok(message(Kind::Shutdown(Shutdown {
                reason,
                cause: ShutdownCause::JobFull.into(),
            }))));
            return Arrival::TurnedAway;
        }
        self.waiting.push(Member {
            id,
            outbox,
            ring_address,
            last_heard: Instant::now(),
        });
        Arrival::Waiting
    }

    /// Makes the waiting workers members (they take the next ranks); returns their ids.
    pub fn admit(&mut self) -> Vec<WorkerId> {
        let admitted: Vec<WorkerId> = self.waiting.iter().map(|m| m.id).collect();
        self.members.append(&mut self.waiting);
        admitted
    }

    /// Notes that `worker` is alive.
    pub fn heard(&mut self, worker: WorkerId) {
        if let Some(m) = self
            .members
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|m| m.id == worker)
        {
            m.last_heard = Instant::now();
        }
    }

    /// Forgets a member or waiting worker whose session ended; true if it was a member.
    pub fn remove(&mut self, worker: WorkerId) -> bool {
        self.waiting.retain(|m| m.id != worker);
        let before = self.members.len();
        self.members.retain(|m| m.id != worker);
        self.members.len() != before
    }

    /// Drops a member and ends its session. A worker evicted for being slow or silent may
    /// register again (`may_rejoin`); one that sent unusable answers is told to stop.
    pub fn evict(&mut self, worker: WorkerId, reason: &str, may_rejoin: bool) {
        let Some(index) = self.members.iter().position(|m| m.id == worker) else {
            return;
        };
        let member = self.members.remove(index);
        let kind = if may_rejoin {
            Kind::Evicted(Evicted {
                reason: reason.to_string(),
            })
        } else {
            Kind::Shutdown(Shutdown {
                reason: format!("evicted: {reason}"),
                cause: ShutdownCause::Refused.into(),
            })
        };
        // `try_send`: an evicted worker may be stopped with a full outbox; waiting for it
        // would stall the job it was evicted from. Dropping the outbox ends the session.
        let _ = member.outbox.try_send(Ok(message(kind)));
    }

    /// Queues a request for a member. False when its outbox is full: a worker that has not
    /// taken its previous requests is not reading its session, and waiting for it would stall
    /// the job. A closed outbox is not reported here: the loop hears of the session's end as
    /// [`Event::Left`](crate::event::Event::Left).
    pub fn send(&self, worker: WorkerId, kind: Kind) -> bool {
        let Some(member) = self.member(worker) else {
            return true;
        };
        match member.outbox.try_send(Ok(message(kind))) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    }

    /// Tells every member and waiting worker to leave, and forgets them.
    pub fn dismiss_all(&mut self, reason: &str) {
        for member in self.members.drain(..).chain(self.waiting.drain(..)) {
            let _ = member.outbox.try_send(Ok(shutdown_message(reason)));
        }
    }
}

/// The message that tells a worker the job is over.
pub fn shutdown_message(reason: &str) -> CoordinatorMessage {
    message(Kind::Shutdown(Shutdown {
        reason: reason.to_string(),
        cause: ShutdownCause::JobEnded.into(),
    }))
}

fn message(kind: Kind) -> CoordinatorMessage {
    CoordinatorMessage { kind: Some(kind) }
}
