//! A worker's side of `--allreduce ring` and `--allreduce nccl`: the worker holds the
//! parameters and the optimiser, sums its gradient with the other workers (over a TCP ring,
//! or with NCCL), and applies each step's update once the coordinator has counted the step.
//!
//! Why the update waits: a ring that breaks part-way through a step can leave some workers
//! with the full sum and others without. Holding the update until a later message says the
//! step is committed (`committed_steps` rises past it) keeps every worker's replica the same;
//! a step the coordinator gave up is dropped by all.

use crate::{
    Error, Result,
    executor::Executor,
    nccl::{self, NcclRing},
    ring::{Ring, RingConfig, RingListener},
};
use candle_core::Device;
use common::{
    ids::Rank,
    optim::{Optimizer, OptimizerConfig, OptimizerState},
    params::l2_norm,
    replica::BatchGradient,
};
use proto::{
    StateTensors,
    v1::{GradientReport, ModelState, NcclId, NcclIdRequest, RingReady, RingStep, SetupRing},
};
use std::{
    net::{SocketAddr, ToSocketAddrs},
    sync::Arc,
    time::{Duration, Instant},
};
use tracing::{debug, info};

/// The replica a ring worker trains, and its place in the current ring.
pub struct RingReplica {
    listener: Arc<RingListener>,
    /// Where NCCL sums (`--allreduce nccl`): the executor's device.
    device: Device,
    optimizer_config: OptimizerConfig,
    /// Whether TCP rings may sum through shared memory when all members share this host.
    shared_memory: bool,
    /// Parameters and optimiser after `committed` steps; `None` until the first `SetupRing`.
    model: Option<(Vec<f32>, Optimizer)>,
    committed: u64,
    pending: Option<Pending>,
    ring: Option<Link>,
    generation: u64,
}

/// How the members of this generation sum their gradients.
enum Link {
    Tcp(Box<Ring>),
    Nccl(NcclRing),
}

impl Link {
    /// Sums `data` over the generation's members, in place.
    fn allreduce_sum(&mut self, step: u64, data: &mut [f32]) -> std::result::Result<(), String> {
        match self {
            Link::Tcp(ring) => ring
                .allreduce_sum(step, data)
                .map(drop)
                .map_err(|e| e.to_string()),
            Link::Nccl(nccl) => nccl.allreduce_sum(data),
        }
    }
}

/// A step's summed gradient, waiting to be committed.
struct Pending {
    step: u64,
    lr: f32,
    gradient: Vec<f32>,
}

impl RingReplica {
    /// A replica that will join TCP rings through `listener` (summing through shared memory
    /// where every member can, if `shared_memory`), or NCCL communicators on `device`.
    pub fn new(
        listener: Arc<RingListener>,
        device: Device,
        optimizer_config: OptimizerConfig,
        shared_memory: bool,
    ) -> Self {
        RingReplica {
            listener,
            device,
            optimizer_config,
            shared_memory,
            model: None,
            committed: 0,
            pending: None,
            ring: None,
            generation: 0,
        }
    }

    /// Applies the pending update if its step is below `committed`, drops it otherwise, and
    /// checks that the replica is then where the coordinator says the job is.
    fn catch_up(&mut self, committed: u64) -> Result<()> {
        if let Some(pending) = self.pending.take()
            && pending.step < committed
        {
            let (parameters, optimizer) = self.model.as_mut().ok_or_else(no_model)?;
            optimizer.step(parameters, &pending.gradient, pending.lr)?;
            self.committed = pending.step + 1;
        }
        if self.committed != committed {
            return Err(Error::BadRequest(format!(
                "this replica is at step {}, the coordinator has committed {committed}",
                self.committed
            )));
        }
        Ok(())
    }

    /// Takes the coordinator's state and connects to the ring of a new generation.
    pub fn setup(&mut self, mut setup: SetupRing) -> Result<RingReady> {
        self.ring = None;
        self.pending = None;
        let state = setup
            .state
            .take()
            .ok_or_else(|| Error::BadRequest("ring set-up without a model state".into()))?;
        self.model = Some(decode_state(&state, &self.optimizer_config)?);
        self.committed = state.committed_steps;
        self.generation = setup.generation;
        if !setup.nccl_id.is_empty() {
            return self.setup_nccl(&setup);
        }
        // A peer this worker cannot resolve or reach is not its fault: it says so in its
        // answer, and the coordinator decides.
        let peers = match resolve(&setup.peers) {
            Ok(peers) => peers,
            Err(error) => {
                return Ok(RingReady {
                    generation: setup.generation,
                    error,
                    transport: String::new(),
                });
            }
        };
        let rank = setup.rank as usize;
        if rank >= peers.len() {
            return Err(Error::BadRequest(format!(
                "rank {rank} in a ring of {} workers",
                peers.len()
            )));
        }
        let key: [u8; 16] = setup.key.as_ref().try_into().map_err(|_| {
            Error::BadRequest(format!(
                "ring key of {} bytes, 16 expected",
                setup.key.len()
            ))
        })?;
        if !(setup.timeout_seconds.is_finite() && setup.timeout_seconds > 0.0) {
            return Err(Error::BadRequest(format!(
                "ring timeout of {} s",
                setup.timeout_seconds
            )));
        }
        let config = RingConfig {
            rank: Rank(setup.rank),
            peers,
            generation: setup.generation,
            key,
            timeout: Duration::from_secs_f64(setup.timeout_seconds),
            // The one buffer a ring step sums: the gradient, as long as the parameters.
            shared_memory_floats: match &self.model {
                Some((parameters, _)) if self.shared_memory => parameters.len(),
                _ => 0,
            },
        };
        let started = Instant::now();
        let mut transport = String::new();
        let error = match Ring::connect(&self.listener, &config) {
            Ok(ring) => {
                transport = ring.transport().to_string();
                self.ring = Some(Link::Tcp(Box::new(ring)));
                info!(
                    generation = setup.generation,
                    rank,
                    size = config.peers.len(),
                    "ring connected in {:.3} s; summing over {}",
                    started.elapsed().as_secs_f64(),
                    transport
                );
                String::new()
            }
            Err(e) => e.to_string(),
        };
        Ok(RingReady {
            generation: setup.generation,
            error,
            transport,
        })
    }

    /// Joins the generation's NCCL communicator (the state is already taken).
    fn setup_nccl(&mut self, setup: &SetupRing) -> Result<RingReady> {
        let (rank, size) = (setup.rank as usize, setup.peers.len());
        if rank >= size {
            return Err(Error::BadRequest(format!(
                "rank {rank} in an NCCL communicator of {size} workers"
            )));
        }
        let started = Instant::now();
        let error = match NcclRing::connect(&self.device, &setup.nccl_id, rank, size) {
            Ok(comm) => {
                self.ring = Some(Link::Nccl(comm));
                info!(
                    generation = setup.generation,
                    rank,
                    size,
                    "NCCL communicator formed in {:.3} s",
                    started.elapsed().as_secs_f64()
                );
                String::new()
            }
            Err(e) => e,
        };
        Ok(RingReady {
            generation: setup.generation,
            transport: if error.is_empty() {
                "NCCL".into()
            } else {
                String::new()
            },
            error,
        })
    }

    /// Computes this worker's part of a step and sums it over the ring; the update waits for
    /// the step to be committed. A ring failure is reported in the answer, not as an error:
    /// this worker is not at fault.
    pub fn step(&mut self, executor: &mut Executor, request: &RingStep) -> Result<GradientReport> {
        self.catch_up(request.step)?;
        if request.generation != self.generation || self.ring.is_none() {
            return Err(Error::BadRequest(format!(
                "ring step for generation {}, this worker is in generation {}",
                request.generation, self.generation
            )));
        }
        let indices = proto::decode_u32("indices", &request.indices)
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        if request.global_count < indices.len() as u64 {
            return Err(Error::BadRequest(format!(
                "{} images of a step of {}",
                indices.len(),
                request.global_count
            )));
        }
        let started = Instant::now();
        let (parameters, _) = self.model.as_ref().ok_or_else(no_model)?;
        let len = parameters.len();
        let BatchGradient {
            loss_sum,
            correct,
            count,
            mut gradient,
        } = executor.gradient(parameters, &indices, request.dropout_seed)?;
        // A worker without images still takes part in the sum, with zeros.
        if gradient.is_empty() {
            gradient = vec![0.0; len];
        }
        let gradient_norm = l2_norm(&gradient);
        let share = count as f32 / request.global_count.max(1) as f32;
        gradient.iter_mut().for_each(|g| *g *= share);
        let compute_seconds = started.elapsed().as_secs_f64();
        let mut report = GradientReport {
            step: request.step,
            count,
            loss_sum,
            correct,
            gradient: Default::default(),
            compute_seconds,
            allreduce_seconds: 0.0,
            ring_error: String::new(),
            non_finite: false,
            problem: String::new(),
            gradient_norm,
            sum_norm: 0.0,
        };
        if let Some(index) = gradient.iter().position(|g| !g.is_finite()) {
            report.non_finite = true;
            report.problem = format!(
                "gradient holds a non-finite value ({}) at index {index}",
                gradient[index]
            );
        }
        // Even a non-finite gradient goes round the ring, so that the others are not left
        // waiting: the coordinator drops the step and the worker that caused it.
        let ring = self.ring.as_mut().expect("checked above");
        let reduce_started = Instant::now();
        let outcome = ring.allreduce_sum(request.step, &mut gradient);
        report.allreduce_seconds = reduce_started.elapsed().as_secs_f64();
        match outcome {
            Ok(_) => {
                report.sum_norm = l2_norm(&gradient);
                if !report.non_finite && gradient.iter().all(|g| g.is_finite()) {
                    self.pending = Some(Pending {
                        step: request.step,
                        lr: request.lr,
                        gradient,
                    });
                }
            }
            Err(e) => {
                debug!(step = request.step, "all-reduce failed: {e}");
                report.ring_error = e;
                self.ring = None;
            }
        }
        Ok(report)
    }

    /// The replica after `committed` steps, for the coordinator's copy.
    pub fn state(&mut self, committed: u64) -> Result<ModelState> {
        self.catch_up(committed)?;
        let (parameters, optimizer) = self.model.as_ref().ok_or_else(no_model)?;
        let optimizer = optimizer.state();
        Ok(ModelState::encode(
            self.committed,
            &StateTensors {
                parameters: parameters.clone(),
                optimizer_step: optimizer.step,
                first_moment: optimizer.first_moment,
                second_moment: optimizer.second_moment,
            },
        ))
    }
}

/// Makes the NCCL unique id of a new generation, as its rank 0.
pub fn nccl_id(request: &NcclIdRequest) -> NcclId {
    let (id, error) = match nccl::unique_id() {
        Ok(id) => (id, String::new()),
        Err(e) => (Vec::new(), e),
    };
    NcclId {
        generation: request.generation,
        id: id.into(),
        error,
    }
}

fn no_model() -> Error {
    Error::BadRequest("a ring request before the ring was set up".into())
}

/// Resolves the peers' `host:port` addresses (host names work, for Kubernetes services).
fn resolve(peers: &[String]) -> std::result::Result<Vec<SocketAddr>, String> {
    peers
        .iter()
        .map(|peer| {
            peer.to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| format!("cannot resolve ring peer '{peer}'"))
        })
        .collect()
}

fn decode_state(state: &ModelState, config: &OptimizerConfig) -> Result<(Vec<f32>, Optimizer)> {
    let tensors = state
        .decode()
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let optimizer = Optimizer::from_state(
        *config,
        OptimizerState {
            len: tensors.parameters.len(),
            step: tensors.optimizer_step,
            first_moment: tensors.first_moment,
            second_moment: tensors.second_moment,
        },
    )?;
    Ok((tensors.parameters, optimizer))
}
