//! Robust aggregation: every member's gradient is judged against the others of its step
//! before it is used.
//!
//! Finite garbage averages like any gradient: one member sending `1e30`s, or ten times its
//! true gradient with the sign turned, ruins the model for everyone, and that is also what
//! silent data corruption on a bad core looks like. So each step, before averaging, the
//! members' gradient norms (the L2 norm of the gradient of the mean loss over each member's
//! images; ring members report theirs) are compared with a reference:
//!
//! - with three or more members, the lower median of the step's norms, which one member
//!   cannot move far; a member above [`OUTLIER_FACTOR`] times it is refused;
//! - with one or two, the median of the step medians of the last [`HISTORY`] accepted steps
//!   (once there are [`MIN_HISTORY`] of them), with the looser [`HISTORY_FACTOR`]: against
//!   other steps honest gradients spike further than against their own step's.
//!
//! A norm above [`MAX_NORM`] is refused whatever the others send. A refused member is
//! evicted, its samples retrained, the refusal named in the log and in `metrics.jsonl`. When
//! every member of a step is refused, no single member explains it: that is divergence, and
//! the job says so.
//!
//! The epoch records' `gradient_spread` (the largest accepted norm over its step's median)
//! shows how near honest members come to the factor: in the fault suite's four-worker MLP
//! runs it stayed below it in every epoch (`faults::a_rogue_gradient_of_finite_garbage`).

use common::ids::WorkerId;
use std::collections::VecDeque;

/// How far above its step's median (three or more members) a member's gradient norm may be.
pub const OUTLIER_FACTOR: f64 = 8.0;

/// How far above recent steps' median a gradient norm may be when the step has one or two
/// members: honest gradients spike further against other steps (10.6 times, early in an MLP
/// run of the hostile suite) than against their own step's.
pub const HISTORY_FACTOR: f64 = 100.0;

/// A gradient norm no MNIST model produces while training: refused whatever the others send.
/// Cross-entropy gradients of inputs in [0, 1] stay orders of magnitude below it.
pub const MAX_NORM: f64 = 1e4;

/// Accepted steps whose references the single-member rule looks back over.
pub const HISTORY: usize = 64;

/// References needed before the single-member rule applies.
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
    /// The largest accepted norm over the step's reference: how close honest members came
    /// to [`OUTLIER_FACTOR`]. `None` when there was no reference.
    pub spread: Option<f64>,
}

/// The screen's memory: the references of recent accepted steps.
#[derive(Debug, Default)]
pub struct Screen {
    history: VecDeque<f64>,
}

impl Screen {
    /// Judges a step's members. Remembers the step's reference when at least one member
    /// passes.
    pub fn judge(&mut self, norms: &[Norm]) -> Screened {
        let judged: Vec<&Norm> = norms.iter().filter(|n| n.count > 0).collect();
        let mut refusals = Vec::new();
        let mut finite: Vec<f64> = Vec::with_capacity(judged.len());
        for n in &judged {
            if !n.norm.is_finite() || n.norm > MAX_NORM {
                refusals.push(Refusal {
                    worker: n.worker,
                    reason: format!(
                        "gradient norm {:.3e} is above {MAX_NORM:.0e}, more than any MNIST \
                         model produces",
                        n.norm
                    ),
                });
            } else {
                finite.push(n.norm);
            }
        }
        // With three or more members the step's own median; with fewer, recent steps'
        // medians, against which honest gradients spike further (a loss spike, an early
        // step), so with a looser factor.
        let step_reference = (finite.len() >= 3).then(|| lower_median(&mut finite.clone()));
        let (reference, factor, what) = match step_reference {
            Some(step) => (Some(step), OUTLIER_FACTOR, "the step's median"),
            None => (
                self.past_reference(),
                HISTORY_FACTOR,
                "recent steps' median",
            ),
        };
        if let Some(reference) = reference {
            for n in &judged {
                if refusals.iter().any(|r| r.worker == n.worker) {
                    continue;
                }
                if n.norm > factor * reference {
                    refusals.push(Refusal {
                        worker: n.worker,
                        reason: format!(
                            "gradient norm {:.3e} is {} times {what} ({reference:.3e}); at \
                             most {factor} times is accepted",
                            n.norm,
                            ratio(n.norm / reference.max(f64::MIN_POSITIVE))
                        ),
                    });
                }
            }
        }
        let accepted: Vec<f64> = judged
            .iter()
            .filter(|n| refusals.iter().all(|r| r.worker != n.worker))
            .map(|n| n.norm)
            .collect();
        let spread = step_reference
            .filter(|r| *r > 0.0)
            .and_then(|r| accepted.iter().copied().reduce(f64::max).map(|max| max / r));
        if !accepted.is_empty() {
            // With fewer than three members the largest accepted norm: a member sending zeros
            // would otherwise drag the reference down until honest gradients look huge.
            let step_reference =
                step_reference.unwrap_or_else(|| accepted.iter().copied().fold(0.0, f64::max));
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(step_reference);
        }
        Screened {
            refused: refusals,
            spread,
        }
    }

    /// The median of recent steps' references, once there are enough.
    fn past_reference(&self) -> Option<f64> {
        (self.history.len() >= MIN_HISTORY)
            .then(|| lower_median(&mut self.history.iter().copied().collect::<Vec<_>>()))
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

/// The lower median: of an even count the smaller of the two middle values.
fn lower_median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
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
        assert_eq!(screened.spread, Some(4.0));
        assert!(refused(&mut screen, &[1.0, 7.9, 1.2]).is_empty());
    }

    #[test]
    fn one_member_far_above_the_others_is_refused() {
        let mut screen = Screen::default();
        assert_eq!(refused(&mut screen, &[1.0, 1.2, 10.0, 0.9]), [3]);
        // Ten times the gradient, sign turned: its norm is ten times as large.
        assert_eq!(refused(&mut screen, &[0.5, 5.0, 0.6]), [2]);
        let refusal = &screen.judge(&norms(&[1.0, 100.0, 1.1])).refused[0];
        // The lower median of 1.0, 1.1 and 100 is 1.1.
        assert!(refusal.reason.contains("90.9 times"), "{}", refusal.reason);
    }

    #[test]
    fn absurd_norms_are_refused_even_when_every_member_sends_them() {
        let mut screen = Screen::default();
        assert_eq!(refused(&mut screen, &[1e30, 1.0, 1.0]), [1]);
        assert_eq!(refused(&mut screen, &[f64::NAN, 1.0]), [1]);
        assert_eq!(refused(&mut screen, &[2e4, 3e4]), [1, 2]);
        assert_eq!(refused(&mut screen, &[1e30]), [1]);
    }

    #[test]
    fn one_or_two_members_are_judged_against_recent_steps_once_there_are_enough() {
        let mut screen = Screen::default();
        // No history: only the absolute bound applies.
        assert!(refused(&mut screen, &[500.0, 1.0]).is_empty());
        let mut screen = Screen::default();
        for _ in 0..MIN_HISTORY {
            assert!(refused(&mut screen, &[1.0]).is_empty());
        }
        // An honest spike of ten times passes; a hundred and more does not.
        assert!(refused(&mut screen, &[10.6, 1.0]).is_empty());
        assert_eq!(refused(&mut screen, &[1.0, 101.0]), [2]);
        assert_eq!(refused(&mut screen, &[150.0]), [1]);
    }

    #[test]
    fn a_member_sending_zeros_does_not_drag_the_reference_down() {
        let mut screen = Screen::default();
        for _ in 0..HISTORY {
            assert!(refused(&mut screen, &[1.0, 0.0]).is_empty());
        }
        assert!(refused(&mut screen, &[10.0, 0.0]).is_empty());
        let refusal = &screen.judge(&norms(&[1e3, 1e-300, 1.0])).refused[0];
        assert!(
            refusal.reason.contains("1000.0 times"),
            "{}",
            refusal.reason
        );
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
            screen.judge(&norms(&[1.0]));
        }
        for _ in 0..HISTORY {
            assert_eq!(refused(&mut screen, &[1e5]), [1]);
        }
        assert_eq!(
            refused(&mut screen, &[101.0]),
            [1],
            "still judged against 1.0"
        );
    }
}
