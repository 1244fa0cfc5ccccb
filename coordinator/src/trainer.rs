//! The lock-step training loop: one step at a time, every member computes its part of the
//! global batch, the gradients are combined in rank order, and nobody starts the next step
//! before everyone has the new parameters.

use crate::{
    Error, Result,
    averaging::Averaging,
    event::{Event, Outbox, Report},
    metrics::EpochRecord,
    run_dir::{CheckpointMeta, RunDir},
};
use common::{
    ids::{Rank, WorkerId},
    job::JobConfig,
    params::ParamSet,
    seed::derive_seed,
    sharding::{EpochPlan, split_evenly},
};
use proto::v1::{
    ComputeGradient, CoordinatorMessage, EvalReport, Evaluate, JobSpec, Shutdown,
    coordinator_message::Kind,
};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a line of progress is logged within an epoch.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// A worker taking part in the job; its rank is its index in [`Trainer::members`].
struct Member {
    id: WorkerId,
    outbox: Outbox,
}

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

/// Sums over the images one epoch has trained on.
#[derive(Default)]
struct EpochSums {
    count: u64,
    loss_sum: f64,
    correct: u64,
    /// Sum over steps of the slowest worker's computing time.
    compute_seconds: f64,
}

/// Everything the training loop needs; see [`Trainer::run`].
pub struct Trainer {
    pub job: JobConfig,
    pub spec: JobSpec,
    pub params: ParamSet,
    pub averaging: Averaging,
    pub train_len: usize,
    pub test_len: usize,
    pub run_dir: RunDir,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub shutdown: CancellationToken,
    members: Vec<Member>,
}

impl Trainer {
    /// A trainer with no members yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job: JobConfig,
        spec: JobSpec,
        params: ParamSet,
        averaging: Averaging,
        train_len: usize,
        test_len: usize,
        run_dir: RunDir,
        events: mpsc::UnboundedReceiver<Event>,
        shutdown: CancellationToken,
    ) -> Self {
        Trainer {
            job,
            spec,
            params,
            averaging,
            train_len,
            test_len,
            run_dir,
            events,
            shutdown,
            members: Vec::new(),
        }
    }

    /// Waits for the workers, trains every epoch, and tells the workers to leave, also when
    /// training fails.
    pub async fn run(mut self) -> Result<Summary> {
        let outcome = self.train().await;
        let reason = match &outcome {
            Ok(_) => "training complete".to_string(),
            Err(e) => format!("job stopped: {e}"),
        };
        self.dismiss_members(&reason).await;
        outcome
    }

    async fn train(&mut self) -> Result<Summary> {
        let started = Instant::now();
        self.wait_for_members().await?;
        let total_steps = self.job.total_steps(self.train_len);
        let schedule = self.job.schedule(self.train_len);
        info!(
            workers = self.members.len(),
            model = %self.job.model,
            epochs = self.job.epochs,
            steps = total_steps,
            global_batch = self.job.global_batch(),
            peak_lr = schedule.peak(),
            "training starts"
        );
        let mut records = Vec::new();
        let mut global_step = 0u64;
        for epoch in 1..=self.job.epochs {
            let epoch_started = Instant::now();
            let plan = EpochPlan::new(
                self.job.seed,
                u64::from(epoch),
                self.train_len,
                self.job.global_batch(),
            );
            let mut sums = EpochSums::default();
            let mut steps = 0u64;
            let mut last_progress = Instant::now();
            let mut lr = schedule.at(global_step);
            for step_in_epoch in 0..plan.steps() {
                if global_step >= total_steps {
                    break;
                }
                lr = schedule.at(global_step);
                self.step(epoch, global_step, plan.batch(step_in_epoch), lr, &mut sums)
                    .await?;
                global_step += 1;
                steps += 1;
                if last_progress.elapsed() >= PROGRESS_INTERVAL {
                    last_progress = Instant::now();
                    info!(
                        epoch,
                        step = steps,
                        of = plan.steps(),
                        loss = sums.loss_sum / sums.count.max(1) as f64,
                        images_per_sec = sums.count as f64 / epoch_started.elapsed().as_secs_f64(),
                        "progress"
                    );
                }
            }
            let train_seconds = epoch_started.elapsed().as_secs_f64();
            let eval_started = Instant::now();
            let eval = self.evaluate(epoch).await?;
            let eval_seconds = eval_started.elapsed().as_secs_f64();
            let record = EpochRecord {
                epoch,
                train_loss: sums.loss_sum / sums.count.max(1) as f64,
                train_accuracy: sums.correct as f64 / sums.count.max(1) as f64,
                test_loss: eval.loss_sum / eval.count.max(1) as f64,
                test_accuracy: eval.correct as f64 / eval.count.max(1) as f64,
                samples: sums.count,
                test_samples: eval.count,
                workers: self.members.len(),
                images_per_sec: sums.count as f64 / train_seconds,
                seconds: 0.0,
                train_seconds,
                compute_seconds: sums.compute_seconds,
                eval_seconds,
                steps,
                global_step,
                lr,
            };
            self.checkpoint(&record)?;
            let record = EpochRecord {
                seconds: epoch_started.elapsed().as_secs_f64(),
                ..record
            };
            self.run_dir.record(&record)?;
            info!(
                "epoch {}/{}: train loss {:.4}, test loss {:.4}, test accuracy {:.2}%, {:.0} images/s, {:.1} s",
                epoch,
                self.job.epochs,
                record.train_loss,
                record.test_loss,
                record.test_accuracy * 100.0,
                record.images_per_sec,
                record.seconds
            );
            records.push(record);
            if global_step >= total_steps {
                break;
            }
        }
        let last = records.last().expect("at least one epoch ran");
        let summary = Summary {
            job_id: self.spec.job_id.clone(),
            model: self.job.model.to_string(),
            epochs_completed: last.epoch,
            steps: global_step,
            final_test_accuracy: last.test_accuracy,
            final_test_loss: last.test_loss,
            best_test_accuracy: records.iter().map(|r| r.test_accuracy).fold(0.0, f64::max),
            wall_seconds: started.elapsed().as_secs_f64(),
            run_dir: self.run_dir.path().to_path_buf(),
            epochs: records,
            parameters: self.averaging.parameters().to_vec(),
        };
        self.run_dir.write_summary(&summary)?;
        Ok(summary)
    }

    /// Admits sessions until the job has all its workers.
    async fn wait_for_members(&mut self) -> Result<()> {
        info!(
            "waiting for {} worker{}",
            self.job.workers,
            if self.job.workers == 1 { "" } else { "s" }
        );
        while self.members.len() < self.job.workers {
            match self.next_event().await? {
                Event::Joined { worker, outbox } => {
                    self.members.push(Member { id: worker, outbox });
                    info!(%worker, "joined ({}/{})", self.members.len(), self.job.workers);
                }
                Event::Left { worker, reason } => {
                    if let Some(rank) = self.rank_of(worker) {
                        self.members.remove(rank.0 as usize);
                        warn!(%worker, "left before training started: {reason}");
                    }
                }
                Event::ProcessExited { index, status } => {
                    return Err(Error::WorkerExited { index, status });
                }
                Event::Report { worker, .. } => {
                    debug!(%worker, "report before training started: ignored");
                }
            }
        }
        Ok(())
    }

    /// One synchronous step over `batch`, split among the members in rank order.
    async fn step(
        &mut self,
        epoch: u32,
        global_step: u64,
        batch: &[u32],
        lr: f32,
        sums: &mut EpochSums,
    ) -> Result<()> {
        let parameters = proto::encode_f32(self.averaging.parameters());
        let parts = split_evenly(batch.len(), self.members.len());
        for (rank, (member, part)) in self.members.iter().zip(parts).enumerate() {
            let command = ComputeGradient {
                step: global_step,
                epoch: u64::from(epoch),
                parameters: parameters.clone(),
                indices: proto::encode_u32(&batch[part]),
                dropout_seed: derive_seed(self.job.seed, "dropout", &[global_step, rank as u64]),
            };
            send(member, Kind::Compute(command)).await;
        }
        let phase = format!("step {global_step}");
        let reports = self
            .gather(&phase, |report| match report {
                Report::Gradient(g) if g.step == global_step => Some(g),
                _ => None,
            })
            .await?;
        sums.compute_seconds += reports
            .iter()
            .map(|(_, r)| r.compute_seconds)
            .fold(0.0, f64::max);
        for (_, report) in &reports {
            sums.count += report.count;
            sums.loss_sum += report.loss_sum;
            sums.correct += report.correct;
        }
        self.averaging.apply(&reports, lr)
    }

    /// Evaluates the current parameters on the test set, split among the members.
    async fn evaluate(&mut self, epoch: u32) -> Result<EvalReport> {
        let parameters = proto::encode_f32(self.averaging.parameters());
        let parts = split_evenly(self.test_len, self.members.len());
        for (member, part) in self.members.iter().zip(parts) {
            let command = Evaluate {
                epoch: u64::from(epoch),
                parameters: parameters.clone(),
                start: part.start as u64,
                end: part.end as u64,
            };
            send(member, Kind::Evaluate(command)).await;
        }
        let phase = format!("evaluation after epoch {epoch}");
        let reports = self
            .gather(&phase, |report| match report {
                Report::Eval(e) if e.epoch == u64::from(epoch) => Some(e),
                _ => None,
            })
            .await?;
        Ok(reports
            .into_iter()
            .fold(EvalReport::default(), |mut total, (_, r)| {
                total.epoch = r.epoch;
                total.count += r.count;
                total.loss_sum += r.loss_sum;
                total.correct += r.correct;
                total
            }))
    }

    /// Waits until every member has answered the current request; answers are returned in
    /// rank order. Reports that `accept` declines (stale or of another kind) are dropped, and a
    /// member's second answer to the same request does not replace its first.
    async fn gather<T>(
        &mut self,
        phase: &str,
        mut accept: impl FnMut(Report) -> Option<T>,
    ) -> Result<Vec<(WorkerId, T)>> {
        let mut slots: Vec<Option<T>> = self.members.iter().map(|_| None).collect();
        let mut missing = slots.len();
        while missing > 0 {
            match self.next_event().await? {
                Event::Report { worker, report } => {
                    let Some(rank) = self.rank_of(worker) else {
                        debug!(%worker, "report from a non-member: ignored");
                        continue;
                    };
                    if let Report::Failure(problem) = report {
                        return Err(Error::BadReport {
                            worker,
                            what: "answer",
                            problem,
                        });
                    }
                    let slot = &mut slots[rank.0 as usize];
                    match accept(report) {
                        Some(value) if slot.is_none() => {
                            *slot = Some(value);
                            missing -= 1;
                        }
                        _ => debug!(%worker, phase, "stale or duplicate report: ignored"),
                    }
                }
                Event::Left { worker, reason } => {
                    if self.rank_of(worker).is_some() {
                        return Err(Error::WorkerLost {
                            worker,
                            phase: phase.to_string(),
                            reason,
                        });
                    }
                }
                Event::ProcessExited { index, status } => {
                    return Err(Error::WorkerExited { index, status });
                }
                Event::Joined { worker, outbox } => {
                    warn!(%worker, "joined while the job is running: turned away");
                    let _ = outbox
                        .send(Ok(shutdown_message(&format!(
                            "job {} already has its {} workers",
                            self.spec.job_id, self.job.workers
                        ))))
                        .await;
                }
            }
        }
        Ok(self
            .members
            .iter()
            .zip(slots)
            .map(|(m, slot)| (m.id, slot.expect("every slot filled")))
            .collect())
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

    async fn next_event(&mut self) -> Result<Event> {
        tokio::select! {
            event = self.events.recv() => Ok(event.expect("the service keeps a sender alive")),
            () = self.shutdown.cancelled() => Err(Error::Interrupted),
        }
    }

    fn rank_of(&self, worker: WorkerId) -> Option<Rank> {
        self.members
            .iter()
            .position(|m| m.id == worker)
            .map(|index| Rank(index as u32))
    }

    async fn dismiss_members(&mut self, reason: &str) {
        for member in self.members.drain(..) {
            let _ = member.outbox.send(Ok(shutdown_message(reason))).await;
        }
    }
}

async fn send(member: &Member, kind: Kind) {
    // A closed outbox means the session ended; the loop hears of it as `Event::Left`.
    let _ = member
        .outbox
        .send(Ok(CoordinatorMessage { kind: Some(kind) }))
        .await;
}

fn shutdown_message(reason: &str) -> CoordinatorMessage {
    CoordinatorMessage {
        kind: Some(Kind::Shutdown(Shutdown {
            reason: reason.to_string(),
        })),
    }
}
