//! In-process failure cases driven by failpoints (the `fail` crate): process-global, so
//! they live in this binary of their own, built with `--features failpoints`.
