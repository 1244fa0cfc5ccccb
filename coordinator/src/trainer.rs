//! The lock-step training loop: one step at a time, every member computes its part of the
//! global batch, the gradients are combined in rank order, and nobody starts the next step
//! before everyone has the new parameters.
//!
//! Failures do not stop it. A member whose session breaks, that falls silent, that lags far
//! behind the others or that sends an unusable answer is evicted; the step completes with the
//! others' gradients and the evicted member's samples go back to the front of the epoch
//! ([`EpochProgress`]). Workers that arrive wait for the next step boundary. Below
//! `--min-workers` the job pauses.

use crate::{
    Error, Result,
    averaging::{Averaging, Contribution},
    event::{Event, Report},
    membership::{Arrival, Membership, shutdown_message},
    metrics::{Departure, EpochRecord, JoinRecord, ProgressRecord, StepTime},
    progress::EpochProgress,
    resume::{Resume, ResumeState},
    run_dir::{CheckpointMeta, RunDir},
    screening::{Norm, Screen},
    status::{Phase, StatusBoard, WorkerState},
};
use common::{
    dataset::CLASSES,
    ids::WorkerId,
    job::JobConfig,
    params::{ParamSet, check_finite, l2_norm},
    seed::derive_seed,
    sharding::{EpochPlan, split_evenly},
};
use process::{Stop, StopCause};
use proto::health::Liveness;
use proto::v1::{
    ComputeGradient, EvalReport, Evaluate, GradientReport, JobSpec, coordinator_message::Kind,
};
use serde::Serialize;
use std::{
    collections::VecDeque,
    ops::Range,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

mod ring;

pub use ring::Transport;

/// How long a resumed job that has `--min-workers` waits for more before it starts.
const RESUME_SETTLE: Duration = Duration::from_secs(30);

/// How often a loop that waits for an event shows it is still turning.
const LIVENESS_BEAT: Duration = Duration::from_secs(1);

/// What a finished job reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub job_id: String,
    pub model: String,
    pub epochs_completed: u32,
    pub steps: u64,
    pub final_test_accuracy: f64,
    pub final_test_loss: f64,
    pub best_test_accuracy: f64,
    pub wall_seconds: f64,
    pub run_dir: std::path::PathBuf,
    pub epochs: Vec<EpochRecord>,
    /// The trained parameters in sorted-name order (not written to `summary.json`; the last
    /// checkpoint holds them).
    #[serde(skip)]
    pub parameters: Vec<f32>,
}

/// How the loop treats its workers and checkpoints.
#[derive(Debug, Clone)]
pub struct TrainerOptions {
    /// Workers to wait for before the first step.
    pub initial_workers: usize,
    pub min_workers: usize,
    pub max_workers: usize,
    pub worker_timeout: Duration,
    pub pause_timeout: Duration,
    /// Steps between resume checkpoints (0: epoch ends only).
    pub checkpoint_every: u64,
    /// Time between progress records.
    pub progress_every: Duration,
    /// How ring workers sum their gradients (ring jobs only).
    pub transport: Transport,
}

/// Sums over a part of the test set.
#[derive(Debug, Clone, Copy)]
struct EvalSums {
    count: u64,
    loss_sum: f64,
    correct: u64,
    /// Per class, when every part counted them.
    classes: Option<([u64; CLASSES], [u64; CLASSES])>,
}

impl Default for EvalSums {
    fn default() -> Self {
        EvalSums {
            count: 0,
            loss_sum: 0.0,
            correct: 0,
            classes: Some(([0; CLASSES], [0; CLASSES])),
        }
    }
}

impl EvalSums {
    fn add(&mut self, other: &EvalSums) {
        self.count += other.count;
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.classes = match (self.classes, other.classes) {
            (Some((mut count, mut correct)), Some((more_count, more_correct))) => {
                for class in 0..CLASSES {
                    count[class] += more_count[class];
                    correct[class] += more_correct[class];
                }
                Some((count, correct))
            }
            _ => None,
        };
    }
}

/// Training sums at the last progress record, to report the stretch since.
#[derive(Debug, Default, Clone, Copy)]
struct ProgressMark {
    epoch: u32,
    count: u64,
    loss_sum: f64,
    train_seconds: f64,
}

/// What [`Trainer::gather`] makes of one answer.
enum Verdict<T> {
    Accept(T),
    /// Unusable: the worker is evicted and told to stop. `non_finite` marks NaN/Inf values,
    /// which, from every member at once, mean divergence.
    Refuse {
        problem: String,
        non_finite: bool,
    },
    /// An answer to an earlier request, or of another kind.
    Ignore,
}

enum Slot<T> {
    Waiting,
    Done(T),
    Lost,
}

/// The answers to one request, in the order the request went out.
struct Gathered<T> {
    slots: Vec<(WorkerId, Option<T>)>,
    /// Members whose answer was refused because it held NaN or infinity.
    non_finite: Vec<String>,
}

/// Everything the training loop needs; see [`Trainer::run`].
pub struct Trainer {
    job: JobConfig,
    spec: JobSpec,
    params: ParamSet,
    averaging: Averaging,
    train_len: usize,
    /// The test set's labels: an evaluated range's images per class are known.
    test_labels: Vec<u8>,
    run_dir: RunDir,
    events: mpsc::UnboundedReceiver<Event>,
    /// Asked at a step boundary (or in a wait between steps), it ends the loop there.
    stop: Stop,
    /// Beaten whenever the loop turns, for the health port.
    liveness: Liveness,
    options: TrainerOptions,
    membership: Membership,
    progress: EpochProgress,
    global_step: u64,
    records: Vec<EpochRecord>,
    next_worker_id: u64,
    /// Seconds the job ran before this coordinator took it over (resume).
    earlier_seconds: f64,
    last_lr: f32,
    /// The workers' ring (`--allreduce ring`).
    ring: ring::RingState,
    /// What `Status`, the metrics endpoint and the progress display read.
    board: StatusBoard,
    mark: ProgressMark,
    /// Whether the job carries on from a checkpoint (its workers come back one by one).
    resumed: bool,
    /// Judges each step's gradients against each other before they are used.
    screen: Screen,
}

impl Trainer {
    /// A trainer with no members yet, at the start of the job or, given `resume`, where the
    /// checkpoint left it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job: JobConfig,
        spec: JobSpec,
        params: ParamSet,
        averaging: Averaging,
        (train_len, test_labels): (usize, Vec<u8>),
        run_dir: RunDir,
        events: mpsc::UnboundedReceiver<Event>,
        stop: Stop,
        options: TrainerOptions,
        resume: Option<ResumeState>,
        mut board: StatusBoard,
        liveness: Liveness,
    ) -> Self {
        let membership = Membership::new(options.max_workers);
        let (progress, global_step, records, next_worker_id, earlier_seconds) = match resume {
            Some(state) => (
                state.progress,
                state.global_step,
                state.records,
                state.next_worker_id,
                state.wall_seconds,
            ),
            None => {
                let plan = epoch_plan(&job, 1, train_len);
                (EpochProgress::new(1, &plan), 0, Vec::new(), 1, 0.0)
            }
        };
        // A resumed job has evaluated epochs already.
        board.status_mut().last_test = records.last().map(|r| (r.test_accuracy, r.test_loss));
        Trainer {
            job,
            spec,
            params,
            averaging,
            train_len,
            test_labels,
            run_dir,
            events,
            stop,
            liveness,
            options,
            membership,
            resumed: global_step > 0 || !records.is_empty(),
            progress,
            global_step,
            records,
            next_worker_id,
            earlier_seconds,
            last_lr: 0.0,
            ring: ring::RingState::new(global_step),
            board,
            mark: ProgressMark::default(),
            screen: Screen::default(),
        }
    }

    /// Waits for the workers, trains every epoch, and tells the workers to leave, also when
    /// training fails. Stopped by SIGTERM, it leaves them instead: the coordinator that
    /// carries the job on from the checkpoint (the same command, restarted) takes them over.
    pub async fn run(mut self) -> Result<Summary> {
        let outcome = self.train().await;
        let stepping_away = matches!(outcome, Err(Error::Stopped(StopCause::Terminate)));
        let reason = match &outcome {
            Ok(_) => "training complete".to_string(),
            Err(e) => format!("job stopped: {e}"),
        };
        let status = self.board.status_mut();
        match &outcome {
            Ok(_) => status.phase = Phase::Done,
            Err(_) if stepping_away => status.phase = Phase::Stopped,
            Err(e) => {
                status.phase = Phase::Failed;
                status.error = e.to_string();
            }
        }
        self.publish();
        // Sessions opened from now on are told at once that the job is over, or, while this
        // coordinator steps away, to come back (the service sees the queue closed and reads
        // the phase); those whose arrival is still queued are told here, so no worker is left
        // re-registering with a coordinator that will never admit it.
        self.events.close();
        if stepping_away {
            // Dropping the sessions ends them without a word: the workers take it for a lost
            // coordinator and look for the next one.
            self.membership = Membership::new(0);
            return outcome;
        }
        self.membership.dismiss_all(&reason);
        while let Ok(event) = self.events.try_recv() {
            if let Event::Joined { outbox, .. } = event {
                let _ = outbox.try_send(Ok(shutdown_message(&reason)));
            }
        }
        outcome
    }

    /// Trains what is left of the job; stopped at a step boundary, it writes the resume
    /// checkpoint first.
    async fn train(&mut self) -> Result<Summary> {
        let started = Instant::now();
        let outcome = self.train_epochs(started).await;
        if let Err(Error::Stopped(cause)) = &outcome {
            info!(
                ?cause,
                step = self.global_step,
                "stopping: writing the resume checkpoint"
            );
            self.refresh_copy().await?;
            self.save_resume(started)?;
            info!(
                step = self.global_step,
                path = %self.run_dir.resume_path().display(),
                "resume checkpoint written"
            );
        }
        outcome
    }

    /// Returns [`Error::Stopped`] if stopping was asked for: called at step boundaries.
    fn check_stop(&self) -> Result<()> {
        match self.stop.cause() {
            Some(cause) => Err(Error::Stopped(cause)),
            None => Ok(()),
        }
    }

    async fn train_epochs(&mut self, started: Instant) -> Result<Summary> {
        if self.progress.epoch <= self.job.epochs && !self.step_limit_reached() {
            self.wait_for_initial_members().await?;
        }
        let total_steps = self.job.total_steps(self.train_len);
        let schedule = self.job.schedule(self.train_len);
        info!(
            workers = self.membership.len(),
            model = %self.job.model,
            epochs = self.job.epochs,
            steps = total_steps,
            global_batch = self.job.global_batch(),
            peak_lr = schedule.peak(),
            "training {} at epoch {}, step {}",
            if self.global_step == 0 { "starts" } else { "resumes" },
            self.progress.epoch,
            self.global_step,
        );
        while self.progress.epoch <= self.job.epochs {
            let epoch = self.progress.epoch;
            let epoch_started = Instant::now();
            let mut last_progress = Instant::now();
            self.board.status_mut().phase = Phase::Training;
            self.publish();
            while !self.progress.is_done() && !self.step_limit_reached() {
                self.check_stop()?;
                self.last_lr = schedule.at(self.schedule_position());
                let step_started = Instant::now();
                let before = (self.progress.compute_seconds, self.progress.comm_seconds);
                self.step(self.last_lr).await?;
                let seconds = step_started.elapsed().as_secs_f64();
                self.progress.train_seconds += seconds;
                let status = self.board.status_mut();
                status.last_step_seconds = seconds;
                status.last_compute_seconds = self.progress.compute_seconds - before.0;
                status.last_comm_seconds = self.progress.comm_seconds - before.1;
                self.publish();
                let every = self.options.checkpoint_every;
                if every > 0 && self.global_step.is_multiple_of(every) && !self.progress.is_done() {
                    self.refresh_copy().await?;
                    self.save_resume(started)?;
                }
                if last_progress.elapsed() >= self.options.progress_every {
                    last_progress = Instant::now();
                    self.record_progress(started)?;
                }
            }
            self.record_progress(started)?;
            // Training of the epoch is done: a restart from here goes straight to evaluation.
            self.refresh_copy().await?;
            self.save_resume(started)?;
            self.check_stop()?;
            self.board.status_mut().phase = Phase::Evaluating;
            self.publish();
            let eval_started = Instant::now();
            let eval = self.evaluate(epoch).await?;
            let eval_seconds = eval_started.elapsed().as_secs_f64();
            let record = self.epoch_record(eval, eval_seconds, epoch_started);
            self.checkpoint(&record)?;
            self.run_dir.record(&record)?;
            self.board.status_mut().last_test = Some((record.test_accuracy, record.test_loss));
            info!(
                "epoch {}/{}: train loss {:.4}, test loss {:.4}, test accuracy {:.2}%, {:.0} images/s, {:.1} s{}",
                epoch,
                self.job.epochs,
                record.train_loss,
                record.test_loss,
                record.test_accuracy * 100.0,
                record.images_per_sec,
                record.seconds,
                churn_note(&record),
            );
            self.records.push(record);
            let next = epoch + 1;
            self.progress = if next <= self.job.epochs && !self.step_limit_reached() {
                EpochProgress::new(next, &epoch_plan(&self.job, next, self.train_len))
            } else {
                // Past the last epoch: a restart from here only writes the summary.
                EpochProgress {
                    epoch: self.job.epochs + 1,
                    ..EpochProgress::default()
                }
            };
            self.save_resume(started)?;
        }
        let last = self
            .records
            .last()
            .ok_or_else(|| Error::Checkpoint("the checkpoint holds no completed epoch".into()))?;
        let summary = Summary {
            job_id: self.spec.job_id.clone(),
            model: self.job.model.to_string(),
            epochs_completed: last.epoch,
            steps: self.global_step,
            final_test_accuracy: last.test_accuracy,
            final_test_loss: last.test_loss,
            best_test_accuracy: self
                .records
                .iter()
                .map(|r| r.test_accuracy)
                .fold(0.0, f64::max),
            wall_seconds: self.earlier_seconds + started.elapsed().as_secs_f64(),
            run_dir: self.run_dir.path().to_path_buf(),
            epochs: self.records.clone(),
            parameters: self.averaging.parameters().to_vec(),
        };
        self.run_dir.write_summary(&summary)?;
        Ok(summary)
    }

    /// Whether `--max-steps` has been reached. Without it, epochs end when their samples
    /// run out, which takes an extra step when a lost worker's samples were handed back.
    fn step_limit_reached(&self) -> bool {
        self.job
            .max_steps
            .is_some_and(|max| self.global_step >= max)
    }

    /// Where the learning-rate schedule stands: the step the job would be at with the samples
    /// used so far. Without failures this is the global step; steps repeated for a lost
    /// worker's samples do not advance it, so they do not run past the schedule's end.
    fn schedule_position(&self) -> u64 {
        let consumed = self.train_len - self.progress.remaining.len();
        u64::from(self.progress.epoch.saturating_sub(1)) * self.job.steps_per_epoch(self.train_len)
            + consumed.div_ceil(self.job.global_batch()) as u64
    }

    /// Appends a progress record covering the steps since the previous one.
    fn record_progress(&mut self, started: Instant) -> Result<()> {
        let p = &self.progress;
        let mark = if self.mark.epoch == p.epoch {
            self.mark
        } else {
            ProgressMark {
                epoch: p.epoch,
                ..ProgressMark::default()
            }
        };
        let count = p.count - mark.count;
        if count == 0 {
            return Ok(());
        }
        let record = ProgressRecord {
            kind: "progress".into(),
            time: self.earlier_seconds + started.elapsed().as_secs_f64(),
            epoch: p.epoch,
            step: p.steps,
            global_step: self.global_step,
            samples: p.count,
            train_loss: (p.loss_sum - mark.loss_sum) / count.max(1) as f64,
            epoch_train_loss: p.mean_loss(),
            images_per_sec: count as f64 / (p.train_seconds - mark.train_seconds).max(1e-9),
            workers: self.membership.len(),
            lr: self.last_lr,
        };
        self.mark = ProgressMark {
            epoch: p.epoch,
            count: p.count,
            loss_sum: p.loss_sum,
            train_seconds: p.train_seconds,
        };
        self.run_dir.progress(&record)
    }

    /// Publishes the job's figures with the current membership.
    fn publish(&mut self) {
        let p = &self.progress;
        let done = |f: fn(&EpochRecord) -> f64| self.records.iter().map(f).sum::<f64>();
        let (train, compute, comm) = (
            done(|r| r.train_seconds) + p.train_seconds,
            done(|r| r.compute_seconds) + p.compute_seconds,
            done(|r| r.comm_seconds) + p.comm_seconds,
        );
        let images_before: u64 = self.records.iter().map(|r| r.samples).sum();
        let status = self.board.status_mut();
        status.epoch = p.epoch.min(self.job.epochs);
        status.step = p.steps;
        status.global_step = self.global_step;
        status.images_trained = images_before + p.count;
        status.train_loss = p.mean_loss();
        status.images_per_sec = p.count as f64 / p.train_seconds.max(1e-9);
        status.train_seconds = train;
        status.compute_seconds = compute;
        status.comm_seconds = comm;
        self.board.publish(&self.membership.ids());
    }

    fn epoch_record(
        &self,
        eval: EvalSums,
        eval_seconds: f64,
        epoch_started: Instant,
    ) -> EpochRecord {
        let p = &self.progress;
        let steps = p.steps.max(1) as f64;
        let wait = (p.train_seconds - p.compute_seconds - p.comm_seconds).max(0.0);
        EpochRecord {
            epoch: p.epoch,
            train_loss: p.mean_loss(),
            train_accuracy: p.correct as f64 / p.count.max(1) as f64,
            test_loss: eval.loss_sum / eval.count.max(1) as f64,
            test_accuracy: eval.correct as f64 / eval.count.max(1) as f64,
            test_accuracy_per_class: eval.classes.map(|(count, correct)| {
                (0..CLASSES)
                    .map(|c| correct[c] as f64 / count[c].max(1) as f64)
                    .collect()
            }),
            test_samples_per_class: eval.classes.map(|(count, _)| count.to_vec()),
            samples: p.count,
            test_samples: eval.count,
            workers: self.membership.len(),
            images_per_sec: p.count as f64 / p.train_seconds.max(1e-9),
            seconds: epoch_started.elapsed().as_secs_f64(),
            train_seconds: p.train_seconds,
            compute_seconds: p.compute_seconds,
            comm_seconds: p.comm_seconds,
            wait_seconds: wait,
            step_time: StepTime {
                seconds: p.train_seconds / steps,
                compute: p.compute_seconds / steps,
                comm: p.comm_seconds / steps,
                wait: wait / steps,
            },
            eval_seconds,
            steps: p.steps,
            global_step: self.global_step,
            lr: self.last_lr,
            samples_requeued: p.requeued,
            workers_lost: p.lost.clone(),
            workers_joined: p.joined.clone(),
            gradients_refused: p.refused.clone(),
            gradient_spread: p.spread,
        }
    }

    /// Admits sessions until the job has its initial workers. A resumed job's workers come
    /// back one by one, and some may not come back at all (a pod that was not recreated):
    /// once it has `--min-workers`, it starts when none has arrived for [`RESUME_SETTLE`],
    /// and admits the others at step boundaries as they come.
    async fn wait_for_initial_members(&mut self) -> Result<()> {
        let wanted = self.options.initial_workers;
        info!(
            "waiting for {wanted} worker{}",
            if wanted == 1 { "" } else { "s" }
        );
        self.board.status_mut().phase = Phase::WaitingForWorkers;
        self.publish();
        let mut last_arrival = tokio::time::Instant::now();
        while self.membership.len() < wanted {
            let may_start = self.resumed && self.membership.len() >= self.options.min_workers;
            let event = tokio::select! {
                event = self.next_event_or_stop() => event?,
                () = tokio::time::sleep_until(last_arrival + RESUME_SETTLE), if may_start => {
                    info!(
                        "resuming with {} of the {wanted} workers: none arrived for {:.0} s; \
                         the others are admitted as they come",
                        self.membership.len(),
                        RESUME_SETTLE.as_secs_f64()
                    );
                    break;
                }
            };
            self.on_event(event);
            for worker in self.membership.admit() {
                info!(%worker, "joined ({}/{wanted})", self.membership.len());
                self.board.admitted(worker);
                last_arrival = tokio::time::Instant::now();
            }
            self.publish();
        }
        Ok(())
    }

    /// At a step boundary: admits the waiting workers, and pauses while there are fewer
    /// members than `--min-workers`, for at most `--pause-timeout`.
    async fn admit(&mut self) -> Result<()> {
        self.admit_waiting();
        let min = self.options.min_workers;
        if self.membership.len() >= min {
            return Ok(());
        }
        let paused = Instant::now();
        let phase = std::mem::replace(&mut self.board.status_mut().phase, Phase::Paused);
        self.publish();
        warn!(
            "paused: {} of the {min} workers needed; waiting up to {:.0} s for more",
            self.membership.len(),
            self.options.pause_timeout.as_secs_f64()
        );
        let deadline = tokio::time::Instant::now() + self.options.pause_timeout;
        while self.membership.len() < min {
            let event = tokio::select! {
                event = self.next_event_or_stop() => event?,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Error::TooFewWorkers {
                        members: self.membership.len(),
                        min,
                        waited_secs: paused.elapsed().as_secs_f64(),
                    });
                }
            };
            self.on_event(event);
            self.admit_waiting();
            self.publish();
        }
        self.board.status_mut().phase = phase;
        self.publish();
        info!(
            "resumed with {} workers after {:.1} s",
            self.membership.len(),
            paused.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn admit_waiting(&mut self) {
        for worker in self.membership.admit() {
            info!(
                %worker,
                "admitted at step {} ({} workers)",
                self.global_step,
                self.membership.len()
            );
            self.progress.joined.push(JoinRecord {
                worker: worker.to_string(),
                step: self.global_step,
            });
            self.board.admitted(worker);
        }
    }

    /// One synchronous step over the next global batch, split among the members in rank
    /// order. Samples of members lost during the step go back to the front of the epoch.
    async fn step(&mut self, lr: f32) -> Result<()> {
        if self.averaging.is_ring() {
            return self.ring_step(lr).await;
        }
        self.admit().await?;
        let step = self.global_step;
        let batch = self.progress.take(self.job.global_batch());
        let ids = self.membership.ids();
        let parts = split_evenly(batch.len(), ids.len());
        let parameters = proto::encode_f32(self.averaging.parameters());
        let sent = Instant::now();
        for (rank, (&worker, part)) in ids.iter().zip(&parts).enumerate() {
            let command = ComputeGradient {
                step,
                epoch: u64::from(self.progress.epoch),
                parameters: parameters.clone(),
                indices: proto::encode_u32(&batch[part.clone()]),
                dropout_seed: derive_seed(self.job.seed, "dropout", &[step, rank as u64]),
            };
            if !self.membership.send(worker, Kind::Compute(command)) {
                self.evict(worker, "not reading its session", true);
            }
        }
        let expected: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        let len = self.params.len();
        let gather_started = Instant::now();
        let gathered = self
            .gather(&format!("step {step}"), &ids, |rank, report| match report {
                Report::Gradient(g) if g.step == step => {
                    judge_gradient(g, expected[rank], len, sent.elapsed())
                }
                _ => Verdict::Ignore,
            })
            .await?;
        if !ids.is_empty() && gathered.non_finite.len() == ids.len() {
            return Err(Error::Diverged {
                step,
                problem: gathered.non_finite.join("; "),
            });
        }
        let mut lost_samples = Vec::new();
        let mut contributions = Vec::new();
        for ((worker, answer), part) in gathered.slots.into_iter().zip(&parts) {
            match answer {
                Some(contribution) => contributions.push((worker, contribution, part)),
                None => lost_samples.extend_from_slice(&batch[part.clone()]),
            }
        }
        let norms: Vec<Norm> = contributions
            .iter()
            .map(|(worker, c, _)| Norm {
                worker: *worker,
                norm: c.norm,
                count: c.count,
            })
            .collect();
        let refused = self.screen_step(step, &norms)?;
        let contributions: Vec<(WorkerId, Contribution)> = contributions
            .into_iter()
            .filter_map(|(worker, c, part)| {
                if refused.contains(&worker) {
                    lost_samples.extend_from_slice(&batch[part.clone()]);
                    None
                } else {
                    Some((worker, c))
                }
            })
            .collect();
        if !lost_samples.is_empty() {
            info!(
                step,
                samples = lost_samples.len(),
                "samples of lost workers go back to the epoch"
            );
            self.progress.requeue(&lost_samples);
        }
        if contributions.is_empty() {
            warn!(step, "no worker finished the step: it is repeated");
            return Ok(());
        }
        let p = &mut self.progress;
        let compute = contributions
            .iter()
            .map(|(_, c)| c.compute_seconds)
            .fold(0.0, f64::max);
        p.compute_seconds += compute;
        // Requests and gradients in transit, beyond the slowest worker's computing.
        p.comm_seconds += (gather_started.elapsed().as_secs_f64() - compute).max(0.0);
        for (worker, c) in &contributions {
            p.count += c.count;
            p.loss_sum += c.loss_sum;
            p.correct += c.correct;
            self.board.worker_step(*worker, c.count, c.compute_seconds);
        }
        self.averaging.apply(&contributions, lr)?;
        self.step_counted();
        Ok(())
    }

    /// Judges a step's gradient norms (see [`crate::screening`]): the refused members are
    /// evicted and recorded, and returned. When every member with images is refused, no
    /// single one explains it: the model diverged.
    fn screen_step(&mut self, step: u64, norms: &[Norm]) -> Result<Vec<WorkerId>> {
        // What `scripts/screen_replay.py` replays the screen's rules on.
        trace!(
            step,
            norms = %norms
                .iter()
                .filter(|n| n.count > 0)
                .map(|n| format!("{}:{:e}", n.worker, n.norm))
                .collect::<Vec<_>>()
                .join(" "),
            "gradient norms"
        );
        let screened = self.screen.judge(norms);
        if let Some(spread) = screened.spread {
            self.progress.spread = Some(self.progress.spread.map_or(spread, |s| s.max(spread)));
        }
        let judged = norms.iter().filter(|n| n.count > 0).count();
        if judged > 0 && screened.refused.len() == judged {
            let problem = screened
                .refused
                .iter()
                .map(|r| format!("{}: {}", r.worker, r.reason))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::Diverged { step, problem });
        }
        let mut refused = Vec::with_capacity(screened.refused.len());
        for refusal in screened.refused {
            warn!(worker = %refusal.worker, step, "gradient refused: {}", refusal.reason);
            self.progress.refused.push(Departure {
                worker: refusal.worker.to_string(),
                step,
                reason: refusal.reason.clone(),
            });
            self.evict(
                refusal.worker,
                &format!("gradient refused at step {step}: {}", refusal.reason),
                false,
            );
            refused.push(refusal.worker);
        }
        Ok(refused)
    }

    /// Moves on to the next step once this one's update is in.
    fn step_counted(&mut self) {
        self.global_step += 1;
        self.progress.steps += 1;
        debug!(
            epoch = self.progress.epoch,
            global_step = self.global_step,
            "step done"
        );
    }

    /// Evaluates the current parameters on the test set, split among the members. Parts of
    /// members lost meanwhile are evaluated again by others.
    async fn evaluate(&mut self, epoch: u32) -> Result<EvalSums> {
        let parameters = proto::encode_f32(self.averaging.parameters());
        let mut pending: VecDeque<Range<usize>> =
            split_evenly(self.test_labels.len(), self.membership.len().max(1))
                .into_iter()
                .filter(|r| !r.is_empty())
                .collect();
        let mut total = EvalSums::default();
        while !pending.is_empty() {
            self.admit().await?;
            let ids = self.membership.ids();
            let take = ids.len().min(pending.len());
            let round: Vec<(WorkerId, Range<usize>)> =
                ids.into_iter().zip(pending.drain(..take)).collect();
            for (worker, range) in &round {
                let command = Evaluate {
                    epoch: u64::from(epoch),
                    parameters: parameters.clone(),
                    start: range.start as u64,
                    end: range.end as u64,
                };
                if !self.membership.send(*worker, Kind::Evaluate(command)) {
                    self.evict(*worker, "not reading its session", true);
                }
            }
            let ids: Vec<WorkerId> = round.iter().map(|(w, _)| *w).collect();
            let labels: Vec<Vec<u8>> = round
                .iter()
                .map(|(_, range)| self.test_labels[range.clone()].to_vec())
                .collect();
            let gathered = self
                .gather(
                    &format!("evaluation after epoch {epoch}"),
                    &ids,
                    |rank, report| match report {
                        Report::Eval(e)
                            if e.epoch == u64::from(epoch)
                                && e.start == round[rank].1.start as u64
                                && e.end == round[rank].1.end as u64 =>
                        {
                            judge_eval(&e, &labels[rank])
                        }
                        _ => Verdict::Ignore,
                    },
                )
                .await?;
            for ((_, answer), (_, range)) in gathered.slots.into_iter().zip(round) {
                match answer {
                    Some(sums) => total.add(&sums),
                    None => pending.push_back(range),
                }
            }
        }
        Ok(total)
    }

    /// Waits until every worker in `expected` has answered the current request or is lost.
    /// `judge` sees each answer with the worker's index in `expected`; a worker's second
    /// answer to the same request is ignored, so nothing is counted twice.
    ///
    /// A worker is lost when its session ends, when it is silent (no heartbeat) for
    /// `--worker-timeout`, when it has not answered `--worker-timeout` after half the others
    /// have, or when its answer is refused.
    async fn gather<T>(
        &mut self,
        phase: &str,
        expected: &[WorkerId],
        mut judge: impl FnMut(usize, Report) -> Verdict<T>,
    ) -> Result<Gathered<T>> {
        let timeout = self.options.worker_timeout;
        let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut slots: Vec<Slot<T>> = expected.iter().map(|_| Slot::Waiting).collect();
        let mut non_finite = Vec::new();
        let mut half_answered_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut waiting = 0;
            for (index, &worker) in expected.iter().enumerate() {
                if !matches!(slots[index], Slot::Waiting) {
                    continue;
                }
                let Some(member) = self.membership.member(worker) else {
                    slots[index] = Slot::Lost;
                    continue;
                };
                let silent = now.duration_since(member.last_heard);
                let lagging = half_answered_at.map(|t| now.duration_since(t));
                if silent > timeout {
                    let reason = format!("silent for {:.1} s during {phase}", silent.as_secs_f64());
                    self.evict(worker, &reason, true);
                    slots[index] = Slot::Lost;
                } else if let Some(lag) = lagging.filter(|lag| *lag > timeout) {
                    let reason = format!(
                        "straggler: no answer during {phase} {:.1} s after half the others",
                        lag.as_secs_f64()
                    );
                    self.evict(worker, &reason, true);
                    slots[index] = Slot::Lost;
                } else {
                    waiting += 1;
                }
            }
            if waiting == 0 {
                break;
            }
            let answered = slots.iter().filter(|s| matches!(s, Slot::Done(_))).count();
            if half_answered_at.is_none() && answered > 0 && answered * 2 >= expected.len() {
                half_answered_at = Some(now);
            }
            self.liveness.beat();
            let event = tokio::select! {
                event = self.next_event() => event,
                () = tokio::time::sleep(tick) => continue,
            };
            let Event::Report { worker, report } = event else {
                self.on_event(event);
                continue;
            };
            self.membership.heard(worker);
            if matches!(report, Report::Heartbeat) {
                continue;
            }
            let Some(index) = expected.iter().position(|&w| w == worker) else {
                debug!(%worker, phase, "answer from a worker not asked: ignored");
                continue;
            };
            if !matches!(slots[index], Slot::Waiting) {
                debug!(%worker, phase, "second or late answer: ignored");
                continue;
            }
            let verdict = match report {
                Report::Failure(problem) => Verdict::Refuse {
                    problem: format!("it failed: {problem}"),
                    non_finite: false,
                },
                report => judge(index, report),
            };
            match verdict {
                Verdict::Accept(value) => slots[index] = Slot::Done(value),
                Verdict::Refuse {
                    problem,
                    non_finite: nan,
                } => {
                    if nan {
                        non_finite.push(format!("{worker}: {problem}"));
                    }
                    self.evict(
                        worker,
                        &format!("bad answer during {phase}: {problem}"),
                        false,
                    );
                    slots[index] = Slot::Lost;
                }
                Verdict::Ignore => debug!(%worker, phase, "stale answer: ignored"),
            }
        }
        Ok(Gathered {
            slots: expected
                .iter()
                .zip(slots)
                .map(|(&worker, slot)| match slot {
                    Slot::Done(value) => (worker, Some(value)),
                    Slot::Waiting | Slot::Lost => (worker, None),
                })
                .collect(),
            non_finite,
        })
    }

    /// Membership changes and stray reports, wherever the loop is waiting.
    fn on_event(&mut self, event: Event) {
        match event {
            Event::Joined {
                worker,
                outbox,
                address,
                ring_address,
            } => {
                self.next_worker_id = self.next_worker_id.max(worker.0 + 1);
                match self.membership.arrive(worker, outbox, ring_address) {
                    Arrival::Waiting => {
                        debug!(%worker, "arrived; waits for the next step");
                        self.board.arrived(worker, address);
                    }
                    Arrival::TurnedAway => {
                        warn!(%worker, "turned away: the job has --max-workers workers");
                    }
                }
            }
            Event::Left { worker, reason } => {
                if self.membership.remove(worker) {
                    self.record_loss(worker, &reason);
                }
                self.board.departed(worker, WorkerState::Left, &reason);
            }
            Event::ProcessExited {
                index,
                status,
                restarting,
            } => {
                let what = if restarting {
                    "restarting it"
                } else {
                    "not restarting it"
                };
                warn!("worker process {index} exited ({status}); {what}");
            }
            Event::Report { worker, report } => {
                self.membership.heard(worker);
                if !matches!(report, Report::Heartbeat) {
                    debug!(%worker, "answer outside a request: ignored");
                }
            }
        }
    }

    /// Drops a member; see [`Membership::evict`].
    fn evict(&mut self, worker: WorkerId, reason: &str, may_rejoin: bool) {
        if self.membership.contains(worker) {
            self.membership.evict(worker, reason, may_rejoin);
            self.record_loss(worker, reason);
            self.board.departed(worker, WorkerState::Evicted, reason);
        }
    }

    fn record_loss(&mut self, worker: WorkerId, reason: &str) {
        warn!(
            "worker {worker} lost at step {}: {reason} ({} workers left)",
            self.global_step,
            self.membership.len()
        );
        self.progress.lost.push(Departure {
            worker: worker.to_string(),
            step: self.global_step,
            reason: reason.to_string(),
        });
    }

    /// Writes the resume checkpoint.
    fn save_resume(&self, started: Instant) -> Result<()> {
        let optimizer = self.averaging.optimizer_state();
        let resume = Resume {
            state: ResumeState {
                format: crate::resume::FORMAT,
                job_id: self.spec.job_id.clone(),
                job: self.job.clone(),
                layout_digest: self.spec.layout_digest.clone(),
                dataset_digest: self.spec.dataset_digest.clone(),
                global_step: self.global_step,
                progress: self.progress.clone(),
                records: self.records.clone(),
                next_worker_id: self.next_worker_id,
                optimizer_step: optimizer.step,
                optimizer_len: optimizer.len,
                wall_seconds: self.earlier_seconds + started.elapsed().as_secs_f64(),
                created: chrono::Utc::now().to_rfc3339(),
            },
            parameters: self.averaging.parameters().to_vec(),
            optimizer,
        };
        resume.save(&self.run_dir.resume_path())?;
        debug!(global_step = self.global_step, "resume checkpoint written");
        Ok(())
    }

    fn checkpoint(&self, record: &EpochRecord) -> Result<()> {
        let path = self.run_dir.checkpoint(
            &self.params,
            self.averaging.parameters(),
            &CheckpointMeta {
                job_id: &self.spec.job_id,
                epoch: record.epoch,
                global_step: record.global_step,
                model: self.job.model.name(),
                parameter_count: self.params.len(),
                layout_digest: &self.spec.layout_digest,
                dataset_digest: &self.spec.dataset_digest,
                test_accuracy: record.test_accuracy,
                test_loss: record.test_loss,
                created: chrono::Utc::now().to_rfc3339(),
                job: &self.job,
            },
        )?;
        debug!(path = %path.display(), "checkpoint written");
        Ok(())
    }

    /// The next event; while it waits, the loop still counts as turning.
    async fn next_event(&mut self) -> Event {
        loop {
            self.liveness.beat();
            tokio::select! {
                event = self.events.recv() => {
                    return event.expect("the service keeps a sender alive");
                }
                () = tokio::time::sleep(LIVENESS_BEAT) => {}
            }
        }
    }

    /// The next event, or [`Error::Stopped`] when stopping is asked for first: for the waits
    /// between steps, where the job can stop without losing anything.
    async fn next_event_or_stop(&mut self) -> Result<Event> {
        let stop = self.stop.clone();
        tokio::select! {
            event = self.next_event() => Ok(event),
            cause = stop.requested() => Err(Error::Stopped(cause)),
        }
    }
}

/// The epoch's sample order, fixed by the seed.
fn epoch_plan(job: &JobConfig, epoch: u32, train_len: usize) -> EpochPlan {
    EpochPlan::new(job.seed, u64::from(epoch), train_len, job.global_batch())
}

/// Largest loss one image can have. Each image's cross-entropy is an f32 that is finite (an
/// infinite one is divergence, refused as non-finite) and not negative, so a sum over `n`
/// images lies in `[0, n * f32::MAX]`: generous, yet it keeps every sum the job makes of
/// such sums finite in f64, and so every number it writes.
const MAX_IMAGE_LOSS: f64 = f32::MAX as f64;

/// What a worker's reported seconds may exceed the coordinator's wait for its answer by
/// (worker and coordinator time the same interval on different clocks).
const SECONDS_SLACK: Duration = Duration::from_secs(1);

/// Why a loss sum over `count` images cannot be right: `Some((problem, non_finite))`.
fn loss_problem(field: &str, loss_sum: f64, count: u64) -> Option<(String, bool)> {
    if !loss_sum.is_finite() {
        return Some((format!("{field} {loss_sum} is not finite"), true));
    }
    let most = count as f64 * MAX_IMAGE_LOSS;
    (!(0.0..=most).contains(&loss_sum)).then(|| {
        (
            format!(
                "{field} {loss_sum:e} over {count} images is outside [0, {most:e}] (each image's \
                 loss is a finite f32, not negative)"
            ),
            false,
        )
    })
}

/// Why reported seconds cannot be right: not finite, negative, or longer than the
/// coordinator has waited for the answer.
fn seconds_problem(field: &str, seconds: f64, waited: Duration) -> Option<String> {
    let most = (waited + SECONDS_SLACK).as_secs_f64();
    (!(0.0..=most).contains(&seconds)).then(|| {
        format!(
            "{field} {seconds:e} is outside [0, {most:.3}] (the answer came {:.3} s after the \
             request)",
            waited.as_secs_f64()
        )
    })
}

/// Checks a gradient report against what was asked: the image count, the length, finite
/// values, sums and seconds that can be right for an answer `waited` after the request.
fn judge_gradient(
    report: GradientReport,
    expected: usize,
    len: usize,
    waited: Duration,
) -> Verdict<Contribution> {
    let refuse = |problem: String| Verdict::Refuse {
        problem,
        non_finite: false,
    };
    if report.count != expected as u64 {
        return refuse(format!(
            "gradient over {} images, {expected} were assigned",
            report.count
        ));
    }
    if let Some((problem, non_finite)) = loss_problem("loss sum", report.loss_sum, report.count) {
        return Verdict::Refuse {
            problem,
            non_finite,
        };
    }
    if let Some(problem) = seconds_problem("compute_seconds", report.compute_seconds, waited) {
        return refuse(problem);
    }
    if report.correct > report.count {
        return refuse(format!(
            "{} correct out of {} images",
            report.correct, report.count
        ));
    }
    let gradient = match proto::decode_f32("gradient", &report.gradient) {
        Ok(gradient) => gradient,
        Err(e) => return refuse(e.to_string()),
    };
    if expected > 0 && gradient.len() != len {
        return refuse(format!(
            "gradient of {} floats, the model has {len} parameters",
            gradient.len()
        ));
    }
    if let Err(e) = check_finite("gradient", &gradient) {
        return Verdict::Refuse {
            problem: e.to_string(),
            non_finite: true,
        };
    }
    Verdict::Accept(Contribution {
        count: report.count,
        loss_sum: report.loss_sum,
        correct: report.correct,
        compute_seconds: report.compute_seconds,
        norm: l2_norm(&gradient),
        gradient,
    })
}

/// Checks evaluation sums against the range asked for, whose `labels` the coordinator knows:
/// the image count, a loss sum that can be right, and per-class counts, when the worker sends
/// them, equal to the range's own and adding up to its totals.
fn judge_eval(report: &EvalReport, labels: &[u8]) -> Verdict<EvalSums> {
    let &EvalReport {
        count,
        loss_sum,
        correct,
        ..
    } = report;
    let refuse = |problem: String| Verdict::Refuse {
        problem,
        non_finite: false,
    };
    let classes = match (report.class_count.len(), report.class_correct.len()) {
        (0, 0) => None,
        (CLASSES, CLASSES) => {
            let mut counts = [0; CLASSES];
            let mut corrects = [0; CLASSES];
            counts.copy_from_slice(&report.class_count);
            corrects.copy_from_slice(&report.class_correct);
            Some((counts, corrects))
        }
        (n, m) => {
            return refuse(format!(
                "per-class sums of {n} and {m} classes, the data has {CLASSES}"
            ));
        }
    };
    if count != labels.len() as u64 {
        return refuse(format!(
            "evaluated {count} images, {} were assigned",
            labels.len()
        ));
    }
    if let Some((problem, _)) = loss_problem("test loss sum", loss_sum, count) {
        return refuse(problem);
    }
    if correct > count {
        return refuse(format!("{correct} correct out of {count} images"));
    }
    if let Some((counts, corrects)) = classes {
        let mut truth = [0u64; CLASSES];
        for &label in labels {
            truth[usize::from(label)] += 1;
        }
        if counts != truth {
            return refuse(format!(
                "per-class image counts {counts:?}, the range holds {truth:?}"
            ));
        }
        if let Some(class) = (0..CLASSES).find(|&c| corrects[c] > counts[c]) {
            return refuse(format!(
                "class {class} with {} correct out of {} images",
                corrects[class], counts[class]
            ));
        }
        // Each term is at most the range's length by now, but a sum of client numbers is
        // added with a check all the same.
        let sum = corrects.iter().try_fold(0u64, |sum, &c| sum.checked_add(c));
        if sum != Some(correct) {
            return refuse(format!(
                "per-class correct counts add up to {}, the total is {correct}",
                sum.map_or("more than 2^64".to_string(), |s| s.to_string())
            ));
        }
    }
    Verdict::Accept(EvalSums {
        count,
        loss_sum,
        correct,
        classes,
    })
}

fn churn_note(record: &EpochRecord) -> String {
    if record.workers_lost.is_empty() && record.workers_joined.is_empty() {
        return String::new();
    }
    format!(
        "; {} worker(s) lost, {} joined, {} samples reassigned",
        record.workers_lost.len(),
        record.workers_joined.len(),
        record.samples_requeued
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(count: u64, correct: u64, gradient: &[f32]) -> GradientReport {
        GradientReport {
            step: 3,
            count,
            loss_sum: 1.5,
            correct,
            gradient: proto::encode_f32(gradient),
            compute_seconds: 0.01,
            ..Default::default()
        }
    }

    fn refusal(verdict: Verdict<Contribution>) -> (String, bool) {
        match verdict {
            Verdict::Refuse {
                problem,
                non_finite,
            } => (problem, non_finite),
            Verdict::Accept(_) => panic!("accepted"),
            Verdict::Ignore => panic!("ignored"),
        }
    }

    /// An answer that came a second after its request.
    const WAITED: Duration = Duration::from_secs(1);

    #[test]
    fn gradients_that_do_not_fit_the_request_are_refused_with_the_reason() {
        let good = [0.5, -0.25, 1.0];
        let judge = |report| judge_gradient(report, 4, 3, WAITED);
        assert!(matches!(
            judge(report(4, 2, &good)),
            Verdict::Accept(Contribution { count: 4, .. })
        ));

        let (problem, nan) = refusal(judge(report(1_000_000, 2, &good)));
        assert!(
            problem.contains("1000000 images, 4 were assigned") && !nan,
            "{problem}"
        );

        let (problem, _) = refusal(judge(report(4, 5, &good)));
        assert!(problem.contains("5 correct out of 4"), "{problem}");

        let (problem, _) = refusal(judge(report(4, 2, &good[..2])));
        assert!(problem.contains("2 floats"), "{problem}");

        let (problem, nan) = refusal(judge(report(4, 2, &[0.0, f32::INFINITY, 0.0])));
        assert!(problem.contains("non-finite") && nan, "{problem}");

        let mut odd = report(4, 2, &good);
        odd.gradient = bytes::Bytes::from_static(&[1, 2, 3]);
        let (problem, _) = refusal(judge(odd));
        assert!(problem.contains("gradient"), "{problem}");
    }

    /// Finite numbers no worker can compute: summed into the epoch's figures they would
    /// overflow to infinity and be written as `null`.
    #[test]
    fn loss_sums_and_seconds_that_cannot_be_right_are_refused_naming_the_field() {
        let good = [0.5, -0.25, 1.0];
        for (loss_sum, compute_seconds, named, nan) in [
            (1.7e308, 0.01, "loss sum 1.7e308 over 4 images", false),
            (-0.5, 0.01, "loss sum", false),
            (f64::INFINITY, 0.01, "not finite", true),
            (1.5, 1e300, "compute_seconds 1e300", false),
            (1.5, -1.0, "compute_seconds", false),
            (1.5, f64::NAN, "compute_seconds", false),
        ] {
            let answer = GradientReport {
                loss_sum,
                compute_seconds,
                ..report(4, 2, &good)
            };
            let (problem, non_finite) = refusal(judge_gradient(answer, 4, 3, WAITED));
            assert!(problem.contains(named), "{problem}");
            assert_eq!(non_finite, nan, "{problem}");
        }
        // The largest loss an f32 can hold, for every image, is still a loss.
        let worst = GradientReport {
            loss_sum: 4.0 * f64::from(f32::MAX),
            ..report(4, 2, &good)
        };
        assert!(matches!(
            judge_gradient(worst, 4, 3, WAITED),
            Verdict::Accept(_)
        ));
    }

    fn eval(count: u64, loss_sum: f64, correct: u64) -> EvalReport {
        EvalReport {
            count,
            loss_sum,
            correct,
            ..Default::default()
        }
    }

    /// Test labels of a range of ten images: one of each class.
    const LABELS: [u8; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

    #[test]
    fn evaluation_sums_must_fit_the_range() {
        assert!(matches!(
            judge_eval(&eval(10, 2.0, 9), &LABELS),
            Verdict::Accept(EvalSums { classes: None, .. })
        ));
        for (count, loss, correct) in [
            (11, 2.0, 9),
            (10, f64::NAN, 9),
            (10, -1.0, 9),
            (10, 2.0, 11),
            (10, 1.7e308, 9),
        ] {
            assert!(
                matches!(
                    judge_eval(&eval(count, loss, correct), &LABELS),
                    Verdict::Refuse { .. }
                ),
                "{count} {loss} {correct}"
            );
        }
    }

    #[test]
    fn per_class_sums_must_be_the_ranges_own_and_an_older_worker_drops_them_for_the_epoch() {
        let with_classes = |counts: Vec<u64>, corrects: Vec<u64>| EvalReport {
            class_count: counts,
            class_correct: corrects,
            ..eval(10, 2.0, 9)
        };
        let good = with_classes(vec![1; 10], [vec![0], vec![1; 9]].concat());
        let Verdict::Accept(first) = judge_eval(&good, &LABELS) else {
            panic!("refused");
        };
        assert_eq!(first.classes.map(|(_, c)| c[0]), Some(0));
        // Counts that wrap around u64 to the right total, counts that add up but are not the
        // range's, and correct counts that wrap.
        let wrapping = [vec![u64::MAX, 3], vec![1; 8]].concat();
        for (bad, named) in [
            (with_classes(vec![1; 9], vec![1; 9]), "9 and 9 classes"),
            (
                with_classes(wrapping.clone(), [vec![0], vec![1; 9]].concat()),
                "the range holds",
            ),
            (
                with_classes([vec![0, 2], vec![1; 8]].concat(), vec![0; 10]),
                "the range holds",
            ),
            (
                with_classes(vec![1; 10], [vec![2], vec![1; 9]].concat()),
                "class 0 with 2 correct out of 1",
            ),
            (
                with_classes(vec![1; 10], vec![1; 10]),
                "add up to 10, the total is 9",
            ),
        ] {
            match judge_eval(&bad, &LABELS) {
                Verdict::Refuse { problem, .. } => assert!(problem.contains(named), "{problem}"),
                _ => panic!("accepted {bad:?}"),
            }
        }
        let mut total = EvalSums::default();
        total.add(&first);
        assert_eq!(total.classes.map(|(n, _)| n.iter().sum::<u64>()), Some(10));
        let Verdict::Accept(older) = judge_eval(&eval(10, 2.0, 9), &LABELS) else {
            panic!("refused");
        };
        total.add(&older);
        assert_eq!((total.count, total.classes.is_none()), (20, true));
    }
}
