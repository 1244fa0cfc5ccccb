//! Exit statuses, which supervisors (Kubernetes' pod failure policies among them) read: 0
//! done, [`USAGE`] flags or files that cannot work, [`RETRYABLE`] worth running again,
//! 130 and 143 stopped by a signal ([`StopCause::exit_status`](crate::StopCause::exit_status)),
//! 1 anything else.

/// Flags or files that cannot work, as clap's own errors exit: starting the program again
/// unchanged will not help.
pub const USAGE: u8 = 2;

/// Stopped by something outside the job (its workers did not come back): running it again
/// (`--resume`) may succeed. BSD's EX_TEMPFAIL, which supervisors read as "retry".
pub const RETRYABLE: u8 = 75;
