//! Robust aggregation: every member's gradient is judged against the others of its step
//! before it is used.
//!
//! Finite garbage averages like any gradient: one member sending `1e30`s, or ten times its
//! true gradient with the sign turned, ruins the model for everyone, and that is also what
//! silent data corruption on a bad core looks like. So each step, before averaging, the
//! members' gradient norms (the L2 norm of the gradient of the mean loss over each member's
//! images; ring members report theirs) are compared with a reference:
//!
//! - the lower median of the step's norms, with two or more members (with two, the smaller:
//!   of two members that disagree wildly the larger is the one that can do harm);
//! - the median of the step medians of the last [`HISTORY`] accepted steps, once there are
//!   [`MIN_HISTORY`] of them;
//!
//! whichever is larger (so that an honest member outdoing a peer whose images happened to
//! be easy, but not the recent steps, passes; and a lone member is judged too). A member
//! whose norm is above [`OUTLIER_FACTOR`] times the reference, or above
//! [`MAX_NORM`] whatever the others send, is refused: evicted, its samples retrained, the
//! refusal named in the log and in `metrics.jsonl`. When every member of a step is refused,
//! no single member explains it: that is divergence, and the job says so.
//!
//! The factor is far above honest spread: over whole LeNet and MLP runs on MNIST (`cargo
//! test -p coordinator --release screening -- --ignored` prints the spread of a run), the
//! largest honest norm of a step stayed within a few times its median.

use common::ids::WorkerId;
use std::collections::VecDeque;

/// How far above the step's reference a member's gradient norm may be.
pub const OUTLIER_FACTOR: f64 = 8.0;

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
        let step_reference = (finite.len() > 1).then(|| lower_median(&mut finite.clone()));
        // The larger of the two: an honest member that outdoes a peer with a tiny gradient
        // but not recent steps is not refused.
        let reference = match (step_reference, self.past_reference()) {
            (Some(step), Some(past)) => Some(step.max(past)),
            (step, past) => step.or(past),
        };
        if let Some(reference) = reference {
            let what = match step_reference {
                Some(step) if step >= reference => "the step's median",
                _ => "recent steps' median",
            };
            for n in &judged {
                if refusals.iter().any(|r| r.worker == n.worker) {
                    continue;
                }
                if n.norm > OUTLIER_FACTOR * reference {
                    refusals.push(Refusal {
                        worker: n.worker,
                        reason: format!(
                            "gradient norm {:.3e} is {:.1} times {what} ({reference:.3e}); at \
                             most {OUTLIER_FACTOR} times is accepted",
                            n.norm,
                            n.norm / reference.max(f64::MIN_POSITIVE)
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
        let spread = reference
            .filter(|r| *r > 0.0)
            .and_then(|r| accepted.iter().copied().reduce(f64::max).map(|max| max / r));
        if !accepted.is_empty() {
            let step_reference =
                step_reference.unwrap_or_else(|| lower_median(&mut accepted.clone()));
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
        assert!(refused(&mut screen, &[1.0, 7.9]).is_empty());
    }

    #[test]
    fn one_member_far_above_the_others_is_refused() {
        let mut screen = Screen::default();
        assert_eq!(refused(&mut screen, &[1.0, 1.2, 10.0, 0.9]), [3]);
        // Ten times the gradient, sign turned: its norm is ten times as large.
        assert_eq!(refused(&mut screen, &[0.5, 5.0, 0.6]), [2]);
        // Of two, the larger.
        assert_eq!(refused(&mut screen, &[0.5, 50.0]), [2]);
        let refusal = &screen.judge(&norms(&[1.0, 100.0, 1.1])).refused[0];
        assert!(refusal.reason.contains("100.0 times"), "{}", refusal.reason);
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
    fn a_lone_member_is_judged_against_recent_steps_once_there_are_enough() {
        let mut screen = Screen::default();
        // No history: only the absolute bound applies.
        assert!(refused(&mut screen, &[500.0]).is_empty());
        let mut screen = Screen::default();
        for _ in 0..MIN_HISTORY {
            assert!(refused(&mut screen, &[1.0]).is_empty());
        }
        assert!(refused(&mut screen, &[7.0]).is_empty());
        assert_eq!(refused(&mut screen, &[9.0]), [1]);
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
            refused(&mut screen, &[9.0]),
            [1],
            "still judged against 1.0"
        );
    }
}
