//! Robust aggregation: every member's gradient is judged against the others of its step
//! before it is used.
//!
//! Finite garbage averages like any gradient: one member sending `1e30`s, or ten times its
//! true gradient with the sign turned, ruins the model for everyone, and that is also what
//! silent data corruption on a bad core looks like. So each step, before averaging, the
//! members' gradient norms (the L2 norm of the gradient of the mean loss over each member's
//! images; ring members report theirs) are judged by three rules:
//!
//! - a norm above [`MAX_NORM`] is refused whatever the others send;
//! - a norm above [`OUTLIER_FACTOR`] times its reference is refused: with three or more
//!   members the median of the other members' norms, with one or two the median of recent
//!   steps' medians (once there are [`MIN_HISTORY`] of them);
//! - with three or more members, a member whose norm over the others' median has a geometric
//!   mean above [`SUSTAINED_FACTOR`] over its last [`SUSTAINED_STEPS`] steps is refused.
//!
//! Single honest steps cannot be told from garbage by a tight factor: once most images are
//! learnt, a member's gradient is that of the few it still gets wrong, and its norm over the
//! others' median reached 463 in a fault-free 20-epoch MLP job with three ring workers
//! (one step in ten above 8). Over 32 steps those spikes average out (the geometric mean
//! stayed at or below 2.44 in eight fault-free jobs of every model with three and four
//! workers), while a member sending ten times its gradient sits near ten, and is refused
//! within 14-58 steps (`scripts/screen_replay.py` replays these rules on the norms jobs
//! log at trace level). Among two members it cannot be said which one is wrong: only the
//! first two rules apply.
//!
//! Norms below a thousandth of the step's median are no reference: a member sending zeros
//! would otherwise make every honest gradient look large beside it.
//!
//! A refused member is evicted, its samples retrained, the refusal named in the log and in
//! `metrics.jsonl`. When every member of a step is refused, no single member explains it:
//! that is divergence, and the job says so. The epoch records' `gradient_spread` (the
//! largest accepted norm over its reference) shows how far honest steps spike.

use common::ids::WorkerId;
use std::collections::{HashMap, VecDeque};

/// How far above its reference (the others' median, or recent steps') a single step's
/// gradient norm may be: about 20 times the largest honest spike measured (463).
pub const OUTLIER_FACTOR: f64 = 1e4;

/// A gradient norm no MNIST model produces while it learns: refused whatever the others
/// send. Cross-entropy gradients of inputs in [0, 1] stay orders of magnitude below it until
/// the model diverges (an MLP at a rate of 0.8 reached 3e4 within 40 steps); then every
/// member is refused, and the job stops as diverged.
pub const MAX_NORM: f64 = 1e4;

/// Steps over which a member's typical norm, against the others', is taken.
pub const SUSTAINED_STEPS: usize = 32;

/// How far above the others' median a member's norm may sit, as the geometric mean over its
/// last [`SUSTAINED_STEPS`] steps.
pub const SUSTAINED_FACTOR: f64 = 4.0;

/// Below this fraction of the step's median a norm is no reference for the others.
const REFERENCE_FLOOR: f64 = 1e-3;

/// Accepted steps whose medians the one- and two-member rule looks back over.
pub const HISTORY: usize = 64;

/// Step medians needed before the one- and two-member rule applies.
pub const MIN_HISTORY: usize = 8;

/// One member's part of a step, as the screen sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    pub worker: WorkerId,
    /// L2 norm of the gradient of the mean loss over the member's images.
    pub norm: f64,
    /// The member's images in the step; members without images are not judged.
    pub count: u64,
}

/// A refused member and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub worker: WorkerId,
    pub reason: String,
}

/// A step's verdict.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Screened {
    /// The members refused, in the order given.
    pub refused: Vec<Refusal>,
    /// The largest accepted norm over its reference: how far honest steps spike. `None`
    /// when there was no reference.
    pub spread: Option<f64>,
}

/// The screen's memory: recent accepted steps' medians, and each present member's recent
/// log-ratios to the others' median.
#[derive(Debug, Default)]
pub struct Screen {
    history: VecDeque<f64>,
    ratios: HashMap<WorkerId, VecDeque<f64>>,
}

impl Screen {
    /// Judges a step's members. Remembers the step's median when at least one member passes.
    pub fn judge(&mut self, norms: &[Norm]) -> Screened {
        let judged: Vec<&Norm> = norms.iter().filter(|n| n.count > 0).collect();
        // Members not in this step are forgotten: the memory is bounded by the membership.
        self.ratios
            .retain(|worker, _| judged.iter().any(|n| n.worker == *worker));
        let mut refusals = Vec::new();
        let mut sane: Vec<&Norm> = Vec::with_capacity(judged.len());
        for n in &judged {
            if n.norm.is_finite() && (0.0..=MAX_NORM).contains(&n.norm) {
                sane.push(n);
            } else {
                refusals.push(Refusal {
                    worker: n.worker,
                    reason: format!(
                        "gradient norm {:.3e} is above {MAX_NORM:.0e}, more than any MNIST \
                         model produces",
                        n.norm
                    ),
                });
            }
        }
        let values: Vec<f64> = sane.iter().map(|n| n.norm).collect();
        let median = (!values.is_empty()).then(|| upper_median(&values));
        // Each member against its reference: with three or more the others' median, with
        // fewer recent steps'.
        let references: Vec<(&Norm, f64, &str, bool)> = if sane.len() >= 3 {
            let floor = median.unwrap_or(0.0) * REFERENCE_FLOOR;
            sane.iter()
                .filter_map(|n| {
                    let others: Vec<f64> = sane
                        .iter()
                        .filter(|o| o.worker != n.worker && o.norm >= floor && o.norm > 0.0)
                        .map(|o| o.norm)
                        .collect();
                    (!others.is_empty() && n.norm > 0.0)
                        .then(|| (*n, upper_median(&others), "the others' median", true))
                })
                .collect()
        } else {
            let past = self.past_reference().filter(|r| *r > 0.0);
            past.map_or_else(Vec::new, |reference| {
                sane.iter()
                    .map(|n| (*n, reference, "recent steps' median", false))
                    .collect()
            })
        };
        let mut spread: Option<f64> = None;
        for (n, reference, what, sustained) in references {
            if let Some(reason) = self.judge_one(n, reference, what, sustained) {
                refusals.push(Refusal {
                    worker: n.worker,
                    reason,
                });
            } else {
                spread = Some(spread.unwrap_or(0.0).max(n.norm / reference));
            }
        }
        let accepted: Vec<f64> = sane
            .iter()
            .filter(|n| refusals.iter().all(|r| r.worker != n.worker))
            .map(|n| n.norm)
            .collect();
        if !accepted.is_empty() {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(upper_median(&accepted));
        }
        Screened {
            refused: refusals,
            spread,
        }
    }

    /// One member's norm against `reference`: the single-step factor, and with `sustained`
    /// its recent steps' geometric mean. Why it is refused, if it is.
    fn judge_one(
        &mut self,
        n: &Norm,
        reference: f64,
        what: &str,
        sustained: bool,
    ) -> Option<String> {
        let over = n.norm / reference;
        if over > OUTLIER_FACTOR {
            return Some(format!(
                "gradient norm {:.3e} is {} times {what} ({reference:.3e}); at most \
                 {OUTLIER_FACTOR:.0e} times is accepted",
                n.norm,
                ratio(over)
            ));
        }
        if !sustained {
            return None;
        }
        let ratios = self.ratios.entry(n.worker).or_default();
        if ratios.len() == SUSTAINED_STEPS {
            ratios.pop_front();
        }
        ratios.push_back(over.ln());
        if ratios.len() < SUSTAINED_STEPS {
            return None;
        }
        let typical = (ratios.iter().sum::<f64>() / SUSTAINED_STEPS as f64).exp();
        (typical > SUSTAINED_FACTOR).then(|| {
            format!(
                "gradient norm {} times the others' median over its last {SUSTAINED_STEPS} \
                 steps (geometric mean); at most {SUSTAINED_FACTOR} times is accepted",
                ratio(typical)
            )
        })
    }

    /// The median of recent steps' medians, once there are enough.
    fn past_reference(&self) -> Option<f64> {
        (self.history.len() >= MIN_HISTORY)
            .then(|| upper_median(&self.history.iter().copied().collect::<Vec<_>>()))
    }
}

/// A ratio as a reader takes it in: 10.6, or 1.64e300.
fn ratio(value: f64) -> String {
    if value < 1e4 {
        format!("{value:.1}")
    } else {
        format!("{value:.2e}")
    }
}

/// The upper median: of an even count the larger of the two middle values.
fn upper_median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norms(values: &[f64]) -> Vec<Norm> {
        values
            .iter()
            .enumerate()
            .map(|(i, &norm)| Norm {
                worker: WorkerId(i as u64 + 1),
                norm,
                count: 64,
            })
            .collect()
    }

    fn refused(screen: &mut Screen, values: &[f64]) -> Vec<u64> {
        screen
            .judge(&norms(values))
            .refused
            .into_iter()
            .map(|r| r.worker.0)
            .collect()
    }

    #[test]
    fn honest_spread_passes_and_is_measured() {
        let mut screen = Screen::default();
        let screened = screen.judge(&norms(&[1.0, 2.5, 0.5, 4.0]));
        assert!(screened.refused.is_empty());
        // 4.0 against the upper median of 1.0, 2.5 and 0.5.
        assert_eq!(screened.spread, Some(4.0));
        // Single honest steps spike far: 463 times was measured.
        assert!(refused(&mut screen, &[1e-3, 0.7, 1.2e-3]).is_empty());
    }

    #[test]
    fn one_step_far_above_the_others_is_refused() {
        let mut screen = Screen::default();
        assert_eq!(refused(&mut screen, &[1e-3, 1.2e-3, 20.0, 0.9e-3]), [3]);
        let refusal = &screen.judge(&norms(&[1e-3, 50.0, 1.1e-3])).refused[0];
        // The others' upper median: of 1e-3 and 1.1e-3 the larger.
        assert!(
            refusal.reason.contains("4.55e4 times"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn absurd_norms_are_refused_even_when_every_member_sends_them() {
        let mut screen = Screen::default();
        assert_eq!(refused(&mut screen, &[1e30, 1.0, 1.0]), [1]);
        assert_eq!(refused(&mut screen, &[f64::NAN, 1.0]), [1]);
        assert_eq!(refused(&mut screen, &[-1.0, 1.0, 1.0]), [1]);
        assert_eq!(refused(&mut screen, &[2e4, 3e4]), [1, 2]);
        assert_eq!(refused(&mut screen, &[1e30]), [1]);
    }

    #[test]
    fn one_or_two_members_are_judged_against_recent_steps_once_there_are_enough() {
        let mut screen = Screen::default();
        // No history: only the absolute bound applies.
        assert!(refused(&mut screen, &[500.0, 1e-4]).is_empty());
        let mut screen = Screen::default();
        for _ in 0..MIN_HISTORY {
            assert!(refused(&mut screen, &[1e-3]).is_empty());
        }
        assert!(refused(&mut screen, &[5.0, 1e-3]).is_empty());
        assert_eq!(refused(&mut screen, &[1e-3, 11.0]), [2]);
        assert_eq!(refused(&mut screen, &[20.0]), [1]);
    }

    #[test]
    fn a_member_sending_ten_times_its_gradient_every_step_is_refused_once_it_shows() {
        let mut screen = Screen::default();
        // Honest members spread around their median; the fourth sends ten times the second's.
        let honest = [[1.0, 1.3, 0.8], [0.9, 1.1, 1.6], [1.2, 0.7, 1.0]];
        for step in 0..SUSTAINED_STEPS - 1 {
            let [a, b, c] = honest[step % 3];
            assert!(
                refused(&mut screen, &[a, b, c, 10.0 * b]).is_empty(),
                "step {step}"
            );
        }
        let refusal = &screen.judge(&norms(&[1.0, 1.3, 0.8, 13.0])).refused;
        assert_eq!(refusal.len(), 1, "{refusal:?}");
        assert_eq!(refusal[0].worker, WorkerId(4));
        assert!(
            refusal[0].reason.contains("last 32 steps"),
            "{}",
            refusal[0].reason
        );
    }

    #[test]
    fn honest_spikes_now_and_then_are_not_a_sustained_excess() {
        let mut screen = Screen::default();
        for step in 0..10 * SUSTAINED_STEPS {
            // Every third step one member's norm is 100 times the others', in turn.
            let mut step_norms = [1.0, 1.1, 0.9];
            if step % 3 == 0 {
                step_norms[step / 3 % 3] = 100.0;
            }
            assert!(refused(&mut screen, &step_norms).is_empty(), "step {step}");
        }
    }

    #[test]
    fn departed_members_are_forgotten() {
        let mut screen = Screen::default();
        for _ in 0..SUSTAINED_STEPS - 1 {
            screen.judge(&norms(&[1.0, 1.0, 1.0, 9.0]));
        }
        // Member 4 leaves for a step; its record goes, so one more step does not refuse it.
        screen.judge(&norms(&[1.0, 1.0, 1.0]));
        assert_eq!(screen.ratios.len(), 3);
        assert!(refused(&mut screen, &[1.0, 1.0, 1.0, 9.0]).is_empty());
    }

    #[test]
    fn members_sending_zeros_do_not_make_honest_gradients_look_large() {
        let mut screen = Screen::default();
        for step in 0..4 * SUSTAINED_STEPS {
            assert!(
                refused(&mut screen, &[1.0, 1.0, 1e-30, 0.0]).is_empty(),
                "step {step}"
            );
        }
        for _ in 0..HISTORY {
            assert!(refused(&mut screen, &[1.0, 0.0]).is_empty());
        }
        assert!(refused(&mut screen, &[10.0, 0.0]).is_empty());
    }

    #[test]
    fn members_without_images_are_not_judged() {
        let mut screen = Screen::default();
        let mut step = norms(&[1.0, 1.0, 1e9]);
        step[2].count = 0;
        assert!(screen.judge(&step).refused.is_empty());
    }

    #[test]
    fn refused_steps_leave_the_history_alone() {
        let mut screen = Screen::default();
        for _ in 0..MIN_HISTORY {
            screen.judge(&norms(&[1e-3]));
        }
        for _ in 0..HISTORY {
            assert_eq!(refused(&mut screen, &[11.0]), [1]);
        }
        assert_eq!(
            refused(&mut screen, &[11.0]),
            [1],
            "still judged against 1e-3"
        );
    }
}
