//! What the job is doing, as a snapshot the training loop publishes at every step boundary
//! and phase change. Readers (the `Status` RPC, the Prometheus endpoint, the progress
//! display) hold a [`watch::Receiver`] and never lock anything the loop waits on.

use common::ids::WorkerId;
use serde::Serialize;
use std::{collections::BTreeMap, time::Instant};
use tokio::sync::watch;

/// Departed workers kept in the snapshot: enough to see recent churn, bounded however long a
/// job with restarting workers runs.
const DEPARTED_KEPT: usize = 16;

/// Where the job is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    WaitingForWorkers,
    Training,
    Evaluating,
    /// Fewer members than `--min-workers`.
    Paused,
    Done,
    Failed,
    /// Asked to stop (SIGTERM): the resume checkpoint is written and the workers wait for the
    /// coordinator that carries the job on.
    Stopped,
}

impl Phase {
    /// The phase in words, as `coordinator status` and the metrics label show it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::WaitingForWorkers => "waiting_for_workers",
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Paused => "paused",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }

    /// Every phase, for metrics that list each one.
    pub const ALL: [Phase; 7] = [
        Phase::WaitingForWorkers,
        Phase::Training,
        Phase::Evaluating,
        Phase::Paused,
        Phase::Done,
        Phase::Failed,
        Phase::Stopped,
    ];
}

/// What a worker is to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Session open, admitted at the next step boundary.
    Joining,
    Active,
    /// Dropped by the coordinator.
    Evicted,
    /// Its session ended.
    Left,
}

impl WorkerState {
    /// The state in words.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Joining => "joining",
            WorkerState::Active => "active",
            WorkerState::Evicted => "evicted",
            WorkerState::Left => "left",
        }
    }

    /// Every state, for metrics that list each one.
    pub const ALL: [WorkerState; 4] = [
        WorkerState::Joining,
        WorkerState::Active,
        WorkerState::Evicted,
        WorkerState::Left,
    ];
}

/// One worker as the job sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerStatus {
    pub id: WorkerId,
    /// Where its connection comes from.
    pub address: String,
    pub state: WorkerState,
    /// Why it left or was evicted.
    pub reason: String,
    /// Its part of the last step it took part in: seconds computing, images per second.
    pub last_step_seconds: f64,
    pub images_per_sec: f64,
    /// Steps it took part in and images it trained on (this coordinator's run).
    pub steps: u64,
    pub images: u64,
}

/// The snapshot; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobStatus {
    pub job_id: String,
    pub model: String,
    /// `ps` or `ring`.
    pub allreduce: String,
    pub phase: Phase,
    pub epoch: u32,
    pub epochs: u32,
    /// Steps done in this epoch, and an epoch's steps without failures.
    pub step: u64,
    pub steps_per_epoch: u64,
    pub global_step: u64,
    pub total_steps: u64,
    /// Training images used since the job started.
    pub images_trained: u64,
    /// Mean training loss of the epoch so far.
    pub train_loss: f64,
    /// Training images per second in the epoch so far.
    pub images_per_sec: f64,
    /// Wall time of the last step, and its parts.
    pub last_step_seconds: f64,
    pub last_compute_seconds: f64,
    pub last_comm_seconds: f64,
    /// Sums over the job's steps (this coordinator's run).
    pub train_seconds: f64,
    pub compute_seconds: f64,
    pub comm_seconds: f64,
    /// Since this coordinator started.
    pub elapsed_seconds: f64,
    /// After the last completed epoch: `(test accuracy, test loss)`.
    pub last_test: Option<(f64, f64)>,
    /// Members in rank order, then waiting workers, then recent departures.
    pub workers: Vec<WorkerStatus>,
    /// Why the job failed.
    pub error: String,
}

impl JobStatus {
    /// Workers in `state`.
    pub fn count(&self, state: WorkerState) -> usize {
        self.workers.iter().filter(|w| w.state == state).count()
    }

    /// Whether this coordinator is done with the job: it completed, failed or was stopped.
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed | Phase::Stopped)
    }
}

/// The training loop's side: keeps the workers' figures between steps and publishes
/// snapshots.
pub struct StatusBoard {
    status: JobStatus,
    /// Every worker seen, by id; departures beyond [`DEPARTED_KEPT`] are forgotten.
    workers: BTreeMap<WorkerId, WorkerStatus>,
    departed: Vec<WorkerId>,
    started: Instant,
    tx: watch::Sender<JobStatus>,
}

impl StatusBoard {
    /// A board showing `status`, and the receiver that readers clone.
    pub fn new(status: JobStatus) -> (StatusBoard, watch::Receiver<JobStatus>) {
        let (tx, rx) = watch::channel(status.clone());
        let board = StatusBoard {
            status,
            workers: BTreeMap::new(),
            departed: Vec::new(),
            started: Instant::now(),
            tx,
        };
        (board, rx)
    }

    /// The figures to update before [`StatusBoard::publish`].
    pub fn status_mut(&mut self) -> &mut JobStatus {
        &mut self.status
    }

    /// A worker's session opened at `address`.
    pub fn arrived(&mut self, id: WorkerId, address: String) {
        self.workers.insert(
            id,
            WorkerStatus {
                id,
                address,
                state: WorkerState::Joining,
                reason: String::new(),
                last_step_seconds: 0.0,
                images_per_sec: 0.0,
                steps: 0,
                images: 0,
            },
        );
    }

    /// A worker became a member.
    pub fn admitted(&mut self, id: WorkerId) {
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.state = WorkerState::Active;
        }
    }

    /// A worker stopped taking part (`state` is `Evicted` or `Left`). An evicted worker's
    /// session closes next: it stays evicted, for the reason it was evicted.
    pub fn departed(&mut self, id: WorkerId, state: WorkerState, reason: &str) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.state == WorkerState::Evicted && state == WorkerState::Left {
            return;
        }
        worker.state = state;
        worker.reason = reason.to_string();
        self.departed.retain(|&w| w != id);
        self.departed.push(id);
        if self.departed.len() > DEPARTED_KEPT {
            let oldest = self.departed.remove(0);
            self.workers.remove(&oldest);
        }
    }

    /// A worker's part of a step: `images` in `compute_seconds`.
    pub fn worker_step(&mut self, id: WorkerId, images: u64, compute_seconds: f64) {
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.steps += 1;
            worker.images += images;
            worker.last_step_seconds = compute_seconds;
            worker.images_per_sec = if compute_seconds > 0.0 {
                images as f64 / compute_seconds
            } else {
                0.0
            };
        }
    }

    /// Sends the current figures to every reader. `members` gives the rank order.
    pub fn publish(&mut self, members: &[WorkerId]) {
        self.status.elapsed_seconds = self.started.elapsed().as_secs_f64();
        let mut workers: Vec<WorkerStatus> = members
            .iter()
            .filter_map(|id| self.workers.get(id).cloned())
            .collect();
        for state in [
            WorkerState::Active,
            WorkerState::Joining,
            WorkerState::Evicted,
            WorkerState::Left,
        ] {
            workers.extend(
                self.workers
                    .values()
                    .filter(|w| w.state == state && !members.contains(&w.id))
                    .cloned(),
            );
        }
        self.status.workers = workers;
        self.tx.send_replace(self.status.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> JobStatus {
        JobStatus {
            epochs: 2,
            ..JobStatus::default()
        }
    }

    #[test]
    fn workers_are_listed_in_rank_order_then_by_state_and_departures_are_bounded() {
        let (mut board, rx) = StatusBoard::new(status());
        for id in 1..=3 {
            board.arrived(WorkerId(id), format!("127.0.0.1:{id}"));
        }
        board.admitted(WorkerId(3));
        board.admitted(WorkerId(1));
        board.worker_step(WorkerId(3), 64, 0.5);
        board.publish(&[WorkerId(3), WorkerId(1)]);
        let snapshot = rx.borrow().clone();
        let listed: Vec<(u64, WorkerState)> =
            snapshot.workers.iter().map(|w| (w.id.0, w.state)).collect();
        assert_eq!(
            listed,
            [
                (3, WorkerState::Active),
                (1, WorkerState::Active),
                (2, WorkerState::Joining)
            ]
        );
        assert_eq!(snapshot.workers[0].images_per_sec, 128.0);
        assert_eq!(snapshot.count(WorkerState::Active), 2);

        for id in 10..10 + DEPARTED_KEPT as u64 + 5 {
            board.arrived(WorkerId(id), String::new());
            board.departed(WorkerId(id), WorkerState::Left, "closed its session");
        }
        board.departed(WorkerId(1), WorkerState::Evicted, "silent");
        board.publish(&[WorkerId(3)]);
        let snapshot = rx.borrow().clone();
        assert_eq!(
            snapshot.count(WorkerState::Left) + snapshot.count(WorkerState::Evicted),
            DEPARTED_KEPT
        );
        assert_eq!(snapshot.workers[0].id, WorkerId(3));
        assert!(
            snapshot
                .workers
                .iter()
                .any(|w| w.id == WorkerId(1) && w.reason == "silent")
        );
    }

    /// The eviction is what an operator needs to see; the session closing after it is its
    /// consequence.
    #[test]
    fn an_evicted_worker_whose_session_then_closes_stays_evicted_with_the_reason() {
        let (mut board, rx) = StatusBoard::new(status());
        board.arrived(WorkerId(4), "127.0.0.1:4".into());
        board.admitted(WorkerId(4));
        board.departed(
            WorkerId(4),
            WorkerState::Evicted,
            "bad answer during step 7: loss sum 1.7e308 over 32 images is outside [0, ...]",
        );
        board.departed(WorkerId(4), WorkerState::Left, "closed its session");
        board.publish(&[]);
        let worker = rx.borrow().workers[0].clone();
        assert_eq!(worker.state, WorkerState::Evicted);
        assert!(
            worker.reason.contains("loss sum 1.7e308"),
            "{}",
            worker.reason
        );

        // A worker that simply left is shown as left.
        board.arrived(WorkerId(5), String::new());
        board.departed(WorkerId(5), WorkerState::Left, "closed its session");
        board.publish(&[]);
        let left = rx
            .borrow()
            .workers
            .iter()
            .find(|w| w.id == WorkerId(5))
            .cloned();
        assert_eq!(
            left.map(|w| (w.state, w.reason)),
            Some((WorkerState::Left, "closed its session".into()))
        );
    }
}
