//! The integration tests: real gRPC over real sockets, real processes, real MNIST.
//!
//! Every module is one area; `support` holds the harness.

mod cluster;
mod deploy;
mod end_to_end;
mod faults;
mod fetch;
mod hostile;
mod kubernetes;
mod plots;
mod predict;
mod procs;
mod ring;
mod security;
mod status;
mod support;
