//! The harness of the integration tests (`it/`, `failpoints/`): the workspace's real binaries
//! and MNIST ([`binaries`]), the captured output of processes ([`log`]), and a lab that runs
//! the Kubernetes manifests of `deploy/` as real processes, each pod in a network namespace of
//! its own ([`kube`]).

pub mod binaries;
pub mod kube;
pub mod log;
