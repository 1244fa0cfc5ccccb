//! `--allreduce nccl`: the workers sum their gradients with NCCL on their CUDA devices
//! instead of over the TCP ring. Only in builds with the `nccl` feature; without it every
//! call says so, and the coordinator stops the job with that message.
//!
//! The protocol is the ring's (see `ring_replica`): one communicator per generation, the
//! update held until the step is committed. Only the transport differs:
//! - rank 0 of a generation makes the NCCL unique id ([`unique_id`]), which also starts
//!   NCCL's bootstrap root in that worker's process; the coordinator hands it to every member
//!   in `SetupRing`, and each joins with [`NcclRing::connect`].
//! - The gradient is computed (by candle, on the worker's device) into host memory, where the
//!   optimiser lives; a step copies it to the device, sums it there in place, and copies the
//!   sum back.

#[cfg(feature = "nccl")]
pub use enabled::{NcclRing, unique_id};

#[cfg(not(feature = "nccl"))]
pub use disabled::{NcclRing, unique_id};

#[cfg(feature = "nccl")]
mod enabled {
    use candle_core::Device;
    use cudarc::{
        driver::CudaSlice,
        nccl::{Comm, Id, ReduceOp, result::NcclError, sys},
    };
    use std::ffi::CStr;

    /// One generation's communicator, from this worker's seat.
    pub struct NcclRing {
        comm: Comm,
        /// The gradient's place on the device, reused step after step.
        buffer: Option<CudaSlice<f32>>,
    }

    /// The bytes of an NCCL unique id (`ncclUniqueId`).
    const ID_BYTES: usize = 128;

    // SAFETY: the communicator and its stream are used by one thread at a time (the worker
    // answers one request after another); NCCL and CUDA streams may move between threads.
    unsafe impl Send for NcclRing {}

    /// A fresh NCCL unique id. It starts NCCL's bootstrap root in this process, which lives
    /// as long as the process does.
    pub fn unique_id() -> Result<Vec<u8>, String> {
        let id = Id::new().map_err(|e| format!("ncclGetUniqueId failed: {}", describe(e)))?;
        Ok(id.internal().iter().map(|&b| b as u8).collect())
    }

    impl NcclRing {
        /// Joins the communicator `id` as `rank` of `size`, on `device`. Blocks until every
        /// rank has joined.
        pub fn connect(
            device: &Device,
            id: &[u8],
            rank: usize,
            size: usize,
        ) -> Result<Self, String> {
            let Device::Cuda(cuda) = device else {
                return Err(
                    "--allreduce nccl needs a CUDA worker (start it with --device cuda:N)".into(),
                );
            };
            let internal: [std::ffi::c_char; ID_BYTES] = id
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| format!("an NCCL id of {} bytes, {ID_BYTES} expected", id.len()))?;
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, Id::uninit(internal))
                .map_err(|e| {
                    format!(
                        "ncclCommInitRank (rank {rank} of {size}) failed: {}",
                        describe(e)
                    )
                })?;
            Ok(NcclRing { comm, buffer: None })
        }

        /// Sums `data` over the communicator, in place.
        pub fn allreduce_sum(&mut self, data: &mut [f32]) -> Result<(), String> {
            let stream = self.comm.stream();
            let fail = |what: &str, e: &dyn std::fmt::Display| {
                format!("NCCL all-reduce: {what} failed: {e}")
            };
            let buffer = match self.buffer.take() {
                Some(buffer) if buffer.len() == data.len() => buffer,
                _ => stream
                    .alloc_zeros::<f32>(data.len())
                    .map_err(|e| fail("allocation", &e))?,
            };
            let buffer = self.buffer.insert(buffer);
            stream
                .memcpy_htod(data, buffer)
                .map_err(|e| fail("copy to the device", &e))?;
            self.comm
                .all_reduce_in_place(buffer, &ReduceOp::Sum)
                .map_err(|e| fail("ncclAllReduce", &describe(e)))?;
            stream
                .memcpy_dtoh(buffer, data)
                .map_err(|e| fail("copy to the host", &e))?;
            stream.synchronize().map_err(|e| fail("synchronising", &e))
        }
    }

    /// NCCL's name for `error` and its last message (e.g. "Duplicate GPU detected").
    fn describe(error: NcclError) -> String {
        // SAFETY: both return pointers to static or thread-local NUL-terminated strings
        // (a null communicator asks for the last error of this thread).
        let (name, last) = unsafe {
            (
                CStr::from_ptr(sys::ncclGetErrorString(error.0)),
                CStr::from_ptr(sys::ncclGetLastError(std::ptr::null_mut())),
            )
        };
        format!("{} ({})", name.to_string_lossy(), last.to_string_lossy())
    }
}

#[cfg(not(feature = "nccl"))]
mod disabled {
    use candle_core::Device;

    const NOT_BUILT: &str =
        "this worker was built without NCCL (build it with --features nccl for --allreduce nccl)";

    /// Never made: this build has no NCCL.
    pub enum NcclRing {}

    pub fn unique_id() -> Result<Vec<u8>, String> {
        Err(NOT_BUILT.into())
    }

    impl NcclRing {
        pub fn connect(
            _device: &Device,
            _id: &[u8],
            _rank: usize,
            _size: usize,
        ) -> Result<Self, String> {
            Err(NOT_BUILT.into())
        }

        pub fn allreduce_sum(&mut self, _data: &mut [f32]) -> Result<(), String> {
            match *self {}
        }
    }
}
