//! The training loop's side of `--allreduce ring` and `--allreduce nccl`: the coordinator
//! orders the steps and keeps the membership, and the workers sum their gradients (over a TCP
//! ring, or with NCCL) and update their own replicas.
//!
//! - A ring is set up for each membership (a *generation*): every member gets its rank, the
//!   members' ring addresses, a random key and the model state from the coordinator's copy,
//!   so that a newcomer and the old members start the generation from the same bits. With
//!   NCCL, rank 0 first makes the generation's NCCL unique id, which replaces the addresses.
//! - A step counts only when every member's all-reduce succeeded. Otherwise the whole global
//!   batch goes back to the epoch, and the next step starts on a new ring without the members
//!   that were lost; the workers drop the update they were holding for it.
//! - The coordinator's copy of the model is refreshed from a member when it needs one: to
//!   evaluate, to checkpoint, to set up a new ring.

use super::{Trainer, Verdict, loss_problem, seconds_problem};
use crate::{Error, Result, event::Report, membership::Member, screening::Norm};
use common::{ids::WorkerId, optim::OptimizerState, seed::derive_seed, sharding::split_evenly};
use proto::{
    StateTensors,
    v1::{
        GradientReport, ModelState, NcclIdRequest, RingStep, SetupRing, StateRequest,
        coordinator_message::Kind,
    },
};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Ring failures in a row, with no worker lost, after which the job stops: the workers cannot
/// reach each other (a firewall, a wrong --ring-host), and retrying will not change that.
const MAX_RING_FAILURES: u32 = 5;

/// Ring steps in a row whose reports do not add up, after which the job stops.
const MAX_UNEXPLAINED_STEPS: u32 = 3;

/// The bytes of an NCCL unique id (`ncclUniqueId`).
const NCCL_ID_BYTES: usize = 128;

/// How ring workers sum their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Over TCP among themselves (`--allreduce ring`).
    Tcp,
    /// With NCCL on their CUDA devices (`--allreduce nccl`).
    Nccl,
}

/// The current ring, if one is formed, and what the coordinator knows of the replicas.
#[derive(Debug, Default)]
pub(super) struct RingState {
    /// The members of the last ring formed, in rank order; they hold the model.
    members: Vec<WorkerId>,
    generation: u64,
    /// Whether `members` still form a working ring.
    intact: bool,
    /// The global step the coordinator's copy of the model belongs to.
    copy_step: u64,
    /// Failures since the last step that counted.
    failures: u32,
    /// Steps dropped in a row because their reports did not add up.
    unexplained: u32,
}

impl RingState {
    /// A ring job whose coordinator holds the model as of `global_step`.
    pub(super) fn new(global_step: u64) -> Self {
        RingState {
            copy_step: global_step,
            ..RingState::default()
        }
    }
}

/// A ring member's answer to a step.
struct RingAnswer {
    report: GradientReport,
}

impl Trainer {
    /// One ring step over the next global batch. Returns without counting a step when the
    /// ring could not be formed or broke; the batch is then back in the epoch.
    pub(super) async fn ring_step(&mut self, lr: f32) -> Result<()> {
        self.admit().await?;
        if !self.ensure_ring().await? {
            return Ok(());
        }
        let step = self.global_step;
        let batch = self.progress.take(self.job.global_batch());
        let ids = self.ring.members.clone();
        let parts = split_evenly(batch.len(), ids.len());
        let sent = Instant::now();
        for (rank, (&worker, part)) in ids.iter().zip(&parts).enumerate() {
            let command = RingStep {
                step,
                epoch: u64::from(self.progress.epoch),
                indices: proto::encode_u32(&batch[part.clone()]),
                dropout_seed: derive_seed(self.job.seed, "dropout", &[step, rank as u64]),
                lr,
                global_count: batch.len() as u64,
                generation: self.ring.generation,
            };
            if !self.membership.send(worker, Kind::RingStep(command)) {
                self.evict(worker, "not reading its session", true);
            }
        }
        let expected: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        let gathered = self
            .gather(&format!("step {step}"), &ids, |rank, report| match report {
                Report::Gradient(g) if g.step == step => {
                    judge_ring_report(g, expected[rank], sent.elapsed())
                }
                _ => Verdict::Ignore,
            })
            .await?;
        if gathered.non_finite.len() == ids.len() {
            return Err(Error::Diverged {
                step,
                problem: gathered.non_finite.join("; "),
            });
        }
        let answers: Vec<&RingAnswer> = gathered.slots.iter().flat_map(|(_, a)| a).collect();
        let ring_errors: Vec<String> = gathered
            .slots
            .iter()
            .filter_map(|(worker, answer)| {
                let error = &answer.as_ref()?.report.ring_error;
                (!error.is_empty()).then(|| format!("{worker}: {error}"))
            })
            .collect();
        if answers.len() < ids.len() || !ring_errors.is_empty() {
            self.ring.intact = false;
            self.progress.requeue(&batch);
            info!(
                step,
                samples = batch.len(),
                "the ring step failed; its samples go back to the epoch"
            );
            return self.ring_failed(step, answers.len() == ids.len(), &ring_errors);
        }
        if !self.screen_ring_step(step, &gathered.slots, batch.len() as u64)? {
            self.ring.intact = false;
            self.progress.requeue(&batch);
            info!(
                step,
                samples = batch.len(),
                "the ring step was refused; its samples go back to the epoch"
            );
            return Ok(());
        }
        let answers: Vec<&RingAnswer> = gathered.slots.iter().flat_map(|(_, a)| a).collect();
        let p = &mut self.progress;
        p.compute_seconds += answers
            .iter()
            .map(|a| a.report.compute_seconds)
            .fold(0.0, f64::max);
        // The worker that waited least in the all-reduce shows the communication itself.
        p.comm_seconds += answers
            .iter()
            .map(|a| a.report.allreduce_seconds)
            .fold(f64::INFINITY, f64::min);
        for answer in &answers {
            p.count += answer.report.count;
            p.loss_sum += answer.report.loss_sum;
            p.correct += answer.report.correct;
        }
        for (worker, answer) in &gathered.slots {
            if let Some(answer) = answer {
                let report = &answer.report;
                self.board
                    .worker_step(*worker, report.count, report.compute_seconds);
            }
        }
        self.ring.failures = 0;
        self.ring.unexplained = 0;
        self.step_counted();
        Ok(())
    }

    /// Judges a ring step's reports before the step is committed: each member's gradient
    /// norm against the others' (see [`crate::screening`]), and the summed gradient against
    /// its parts. False when the step must not be committed: refused members are evicted,
    /// and the members drop the update they hold.
    ///
    /// Every member holds the same summed gradient, whose norm cannot exceed the members'
    /// norms weighted by their shares (the triangle inequality). A sum larger than its parts,
    /// or members disagreeing on it, means a member's report hides what it sent; which one
    /// cannot be told from here, so the step is dropped, and after
    /// [`MAX_UNEXPLAINED_STEPS`] in a row the job stops rather than train on it.
    fn screen_ring_step(
        &mut self,
        step: u64,
        slots: &[(WorkerId, Option<RingAnswer>)],
        global_count: u64,
    ) -> Result<bool> {
        let reports: Vec<(WorkerId, &GradientReport)> = slots
            .iter()
            .filter_map(|(worker, answer)| Some((*worker, &answer.as_ref()?.report)))
            .collect();
        let norms: Vec<Norm> = reports
            .iter()
            .map(|(worker, report)| Norm {
                worker: *worker,
                norm: report.gradient_norm,
                count: report.count,
            })
            .collect();
        if !self.screen_step(step, &norms)?.is_empty() {
            return Ok(false);
        }
        let parts: f64 = reports
            .iter()
            .map(|(_, r)| r.gradient_norm * r.count as f64 / global_count.max(1) as f64)
            .sum();
        let sum_norm = reports.first().map_or(0.0, |(_, r)| r.sum_norm);
        let problem = if reports
            .iter()
            .any(|(_, r)| r.sum_norm.to_bits() != sum_norm.to_bits())
        {
            Some(format!(
                "the members disagree on the summed gradient's norm ({})",
                reports
                    .iter()
                    .map(|(worker, r)| format!("{worker}: {:.6e}", r.sum_norm))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        } else if sum_norm.is_nan() || sum_norm > parts * (1.0 + 1e-3) + 1e-30 {
            Some(format!(
                "the summed gradient's norm {sum_norm:.6e} exceeds the members' weighted \
                 norms {parts:.6e}: a member sent more than it reports"
            ))
        } else {
            None
        };
        let Some(problem) = problem else {
            return Ok(true);
        };
        self.ring.unexplained += 1;
        warn!(step, "ring step dropped: {problem}");
        if self.ring.unexplained >= MAX_UNEXPLAINED_STEPS {
            return Err(Error::Ring(format!(
                "{} ring steps in a row dropped, the last because {problem}; no single member \
                 can be named from the reports: run the job with --allreduce ps, where the \
                 coordinator sees every gradient",
                self.ring.unexplained
            )));
        }
        Ok(false)
    }

    /// Counts a failed step or set-up; too many in a row with every member still there mean
    /// the ring cannot work.
    fn ring_failed(&mut self, step: u64, nobody_lost: bool, errors: &[String]) -> Result<()> {
        if !errors.is_empty() {
            warn!(step, "ring all-reduce failed: {}", errors.join("; "));
        }
        if !nobody_lost {
            return Ok(());
        }
        self.ring.failures += 1;
        if self.ring.failures >= MAX_RING_FAILURES {
            let advice = match self.options.transport {
                Transport::Tcp => {
                    "check that the workers reach each other's ring listeners (--ring-listen, \
                     --ring-host), or use --allreduce ps"
                }
                Transport::Nccl => {
                    "check the workers' NCCL set-up (one GPU per worker: NCCL refuses two ranks on \
                     one device; NCCL_DEBUG=INFO in the workers' environment tells more), or use \
                     --allreduce ring"
                }
            };
            return Err(Error::Ring(format!(
                "failed {} times in a row with every worker still present ({}); {advice}",
                self.ring.failures,
                errors.join("; ")
            )));
        }
        Ok(())
    }

    /// Makes sure the current members form a ring; false when this attempt failed (the
    /// caller tries again at the next step boundary).
    async fn ensure_ring(&mut self) -> Result<bool> {
        let ids = self.membership.ids();
        if self.ring.intact && self.ring.members == ids {
            return Ok(true);
        }
        self.refresh_copy().await?;
        self.ring.generation += 1;
        self.ring.intact = false;
        let generation = self.ring.generation;
        let (peers, nccl_id) = match self.options.transport {
            Transport::Tcp => match self.ring_addresses(&ids) {
                Some(peers) => (peers, Vec::new()),
                None => return Ok(false),
            },
            Transport::Nccl => match self.nccl_id(ids[0], generation).await? {
                Some(id) => (ids.iter().map(ToString::to_string).collect(), id),
                None => return Ok(false),
            },
        };
        if self.membership.ids() != ids {
            // A member left while rank 0 made the NCCL id: set up the new membership.
            return Ok(false);
        }
        let key: [u8; 16] = rand::random();
        let optimizer = self.averaging.optimizer_state();
        let state = ModelState::encode(
            self.global_step,
            &StateTensors {
                parameters: self.averaging.parameters().to_vec(),
                optimizer_step: optimizer.step,
                first_moment: optimizer.first_moment,
                second_moment: optimizer.second_moment,
            },
        );
        for (rank, &worker) in ids.iter().enumerate() {
            let command = SetupRing {
                generation,
                rank: rank as u32,
                peers: peers.clone(),
                key: key.to_vec().into(),
                timeout_seconds: self.options.worker_timeout.as_secs_f64(),
                state: Some(state.clone()),
                nccl_id: nccl_id.clone().into(),
            };
            if !self.membership.send(worker, Kind::SetupRing(command)) {
                self.evict(worker, "not reading its session", true);
            }
        }
        let gathered = self
            .gather(
                &format!("ring set-up {generation}"),
                &ids,
                |_, report| match report {
                    Report::RingReady(ready) if ready.generation == generation => {
                        Verdict::Accept((ready.error, ready.transport))
                    }
                    _ => Verdict::Ignore,
                },
            )
            .await?;
        let errors: Vec<String> = gathered
            .slots
            .iter()
            .filter_map(|(worker, answer)| {
                let (error, _) = answer.as_ref()?;
                (!error.is_empty()).then(|| format!("{worker}: {error}"))
            })
            .collect();
        // Every member settles the same transport; the first that says names it.
        let transport = gathered
            .slots
            .iter()
            .filter_map(|(_, answer)| answer.as_ref())
            .map(|(_, transport)| transport.as_str())
            .find(|transport| !transport.is_empty())
            .unwrap_or("unknown")
            .to_owned();
        let all_answered = gathered.slots.iter().all(|(_, a)| a.is_some());
        // Whoever answered holds the coordinator's state now, formed ring or not.
        self.ring.members = gathered
            .slots
            .iter()
            .filter(|(_, a)| a.is_some())
            .map(|(w, _)| *w)
            .collect();
        if all_answered && errors.is_empty() {
            self.ring.intact = true;
            info!(
                generation,
                workers = ids.len(),
                step = self.global_step,
                %transport,
                "ring formed"
            );
            return Ok(true);
        }
        self.ring_failed(self.global_step, all_answered, &errors)?;
        Ok(false)
    }

    /// The members' ring addresses, in rank order; `None` after evicting one that has none.
    fn ring_addresses(&mut self, ids: &[WorkerId]) -> Option<Vec<String>> {
        let mut peers = Vec::with_capacity(ids.len());
        for &worker in ids {
            match self.membership.member(worker).and_then(ring_address) {
                Some(address) => peers.push(address),
                None => {
                    self.evict(
                        worker,
                        "it has no ring listener (a worker build without --allreduce ring)",
                        false,
                    );
                    return None;
                }
            }
        }
        Some(peers)
    }

    /// Has `rank0` make the NCCL unique id of `generation`; `None` when it was lost first.
    /// A worker that cannot make one never will (no NCCL in its build): the job stops.
    async fn nccl_id(&mut self, rank0: WorkerId, generation: u64) -> Result<Option<Vec<u8>>> {
        if !self
            .membership
            .send(rank0, Kind::NcclIdRequest(NcclIdRequest { generation }))
        {
            self.evict(rank0, "not reading its session", true);
            return Ok(None);
        }
        let gathered = self
            .gather(
                &format!("NCCL id {generation}"),
                &[rank0],
                |_, report| match report {
                    Report::NcclId(id) if id.generation == generation => Verdict::Accept(id),
                    _ => Verdict::Ignore,
                },
            )
            .await?;
        let Some((_, Some(answer))) = gathered.slots.into_iter().next() else {
            return Ok(None);
        };
        if !answer.error.is_empty() {
            return Err(Error::Ring(format!(
                "{rank0} cannot make an NCCL id: {}",
                answer.error
            )));
        }
        if answer.id.len() != NCCL_ID_BYTES {
            return Err(Error::Ring(format!(
                "{rank0} sent an NCCL id of {} bytes, {NCCL_ID_BYTES} expected",
                answer.id.len()
            )));
        }
        Ok(Some(answer.id.to_vec()))
    }

    /// Brings the coordinator's copy of the model up to the current step, from a member of
    /// the last ring. A no-op for parameter-server jobs, whose copy is the model.
    pub(super) async fn refresh_copy(&mut self) -> Result<()> {
        if !self.averaging.is_ring() || self.ring.copy_step == self.global_step {
            return Ok(());
        }
        let committed = self.global_step;
        let holders: Vec<WorkerId> = self
            .ring
            .members
            .iter()
            .copied()
            .filter(|&w| self.membership.contains(w))
            .collect();
        for worker in holders {
            if !self.membership.send(
                worker,
                Kind::StateRequest(StateRequest {
                    committed_steps: committed,
                }),
            ) {
                self.evict(worker, "not reading its session", true);
                continue;
            }
            let len = self.params.len();
            // One optimiser step per committed step since the copy, at most.
            let most_steps = self
                .averaging
                .optimizer_state()
                .step
                .saturating_add(committed.saturating_sub(self.ring.copy_step));
            let gathered = self
                .gather(
                    &format!("state at step {committed}"),
                    &[worker],
                    |_, report| match report {
                        Report::State(state) if state.committed_steps == committed => {
                            judge_state(&state, len, most_steps)
                        }
                        _ => Verdict::Ignore,
                    },
                )
                .await?;
            if let Some((_, Some((parameters, optimizer)))) = gathered.slots.into_iter().next() {
                // Buffers of the wrong length for the optimiser are this worker's fault, not
                // the job's: the next holder is asked.
                match self.averaging.replace(parameters, optimizer) {
                    Ok(()) => {
                        self.ring.copy_step = committed;
                        debug!(%worker, step = committed, "model copy refreshed");
                        return Ok(());
                    }
                    Err(e) => self.evict(
                        worker,
                        &format!("bad answer during state at step {committed}: {e}"),
                        false,
                    ),
                }
            }
        }
        Err(Error::ModelLost(format!(
            "every worker holding the model at step {committed} was lost; resume the job from \
             its last checkpoint (step {}) with --resume",
            self.ring.copy_step
        )))
    }
}

fn ring_address(member: &Member) -> Option<String> {
    member.ring_address.clone()
}

/// Checks a ring member's step report against what was asked, `waited` after the request.
/// Its gradient stays on the workers: the report carries sums only.
fn judge_ring_report(
    report: GradientReport,
    expected: usize,
    waited: Duration,
) -> Verdict<RingAnswer> {
    let refuse = |problem: String, non_finite: bool| Verdict::Refuse {
        problem,
        non_finite,
    };
    if report.non_finite {
        return refuse(report.problem, true);
    }
    if report.count != expected as u64 {
        return refuse(
            format!(
                "gradient over {} images, {expected} were assigned",
                report.count
            ),
            false,
        );
    }
    if let Some((problem, non_finite)) = loss_problem("loss sum", report.loss_sum, report.count) {
        return refuse(problem, non_finite);
    }
    let seconds = [
        ("compute_seconds", report.compute_seconds),
        ("allreduce_seconds", report.allreduce_seconds),
        (
            "compute_seconds + allreduce_seconds",
            report.compute_seconds + report.allreduce_seconds,
        ),
    ];
    if let Some(problem) = seconds
        .iter()
        .find_map(|&(field, value)| seconds_problem(field, value, waited))
    {
        return refuse(problem, false);
    }
    if report.correct > report.count {
        return refuse(
            format!("{} correct out of {} images", report.correct, report.count),
            false,
        );
    }
    if !report.gradient.is_empty() {
        return refuse("a gradient in a ring step's answer".into(), false);
    }
    // The norm of a finite gradient is finite and not negative. The sum's may be infinite
    // when another member's gradient was (that member names itself), never negative.
    if !(report.gradient_norm.is_finite() && report.gradient_norm >= 0.0) {
        return refuse(
            format!("gradient_norm {} is not a norm", report.gradient_norm),
            false,
        );
    }
    if report.sum_norm < 0.0 {
        return refuse(format!("sum_norm {} is not a norm", report.sum_norm), false);
    }
    Verdict::Accept(RingAnswer { report })
}

/// Checks a worker's replica: the model's length, finite values, and no more optimiser steps
/// than `most_steps`.
fn judge_state(
    state: &ModelState,
    len: usize,
    most_steps: u64,
) -> Verdict<(Vec<f32>, OptimizerState)> {
    let refuse = |problem: String| Verdict::Refuse {
        problem,
        non_finite: false,
    };
    let tensors = match state.decode() {
        Ok(tensors) => tensors,
        Err(e) => return refuse(e.to_string()),
    };
    if tensors.parameters.len() != len {
        return refuse(format!(
            "a replica of {} parameters, the model has {len}",
            tensors.parameters.len()
        ));
    }
    for (what, values) in [
        ("parameter", &tensors.parameters),
        ("optimizer first moment", &tensors.first_moment),
        ("optimizer second moment", &tensors.second_moment),
    ] {
        if let Some(index) = values.iter().position(|p| !p.is_finite()) {
            return refuse(format!("replica {what} {index} is not finite"));
        }
    }
    if tensors.optimizer_step > most_steps {
        return refuse(format!(
            "a replica after {} optimiser steps, at most {most_steps} were committed",
            tensors.optimizer_step
        ));
    }
    Verdict::Accept((
        tensors.parameters,
        OptimizerState {
            len,
            step: tensors.optimizer_step,
            first_moment: tensors.first_moment,
            second_moment: tensors.second_moment,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused<T>(verdict: Verdict<T>) -> String {
        match verdict {
            Verdict::Refuse { problem, .. } => problem,
            Verdict::Accept(_) => panic!("accepted"),
            Verdict::Ignore => panic!("ignored"),
        }
    }

    #[test]
    fn ring_reports_with_sums_or_seconds_that_cannot_be_right_are_refused_by_field() {
        let waited = Duration::from_secs(2);
        let report = |loss_sum, compute_seconds, allreduce_seconds| GradientReport {
            step: 1,
            count: 32,
            loss_sum,
            correct: 3,
            compute_seconds,
            allreduce_seconds,
            ..Default::default()
        };
        assert!(matches!(
            judge_ring_report(report(70.0, 0.5, 0.5), 32, waited),
            Verdict::Accept(_)
        ));
        for (bad, named) in [
            (report(1.7e308, 0.5, 0.5), "loss sum 1.7e308 over 32 images"),
            (report(-1.0, 0.5, 0.5), "loss sum"),
            (report(70.0, 1e308, 0.5), "compute_seconds 1e308"),
            (report(70.0, 0.5, f64::INFINITY), "allreduce_seconds"),
            (report(70.0, 0.5, -0.1), "allreduce_seconds"),
            (
                report(70.0, 2.0, 2.0),
                "compute_seconds + allreduce_seconds",
            ),
        ] {
            let problem = refused(judge_ring_report(bad, 32, waited));
            assert!(problem.contains(named), "{problem}");
        }
    }

    #[test]
    fn replicas_with_non_finite_moments_or_too_many_steps_are_refused() {
        let state = |moment: f32, optimizer_step| {
            ModelState::encode(
                9,
                &StateTensors {
                    parameters: vec![0.5; 3],
                    optimizer_step,
                    first_moment: vec![0.0, moment, 0.0],
                    second_moment: Vec::new(),
                },
            )
        };
        assert!(matches!(
            judge_state(&state(0.1, 9), 3, 9),
            Verdict::Accept(_)
        ));
        let problem = refused(judge_state(&state(f32::NAN, 9), 3, 9));
        assert!(
            problem.contains("first moment 1 is not finite"),
            "{problem}"
        );
        let problem = refused(judge_state(&state(0.1, u64::MAX), 3, 9));
        assert!(problem.contains("at most 9 were committed"), "{problem}");
    }
}
