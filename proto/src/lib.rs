//! The versioned gRPC protocol between coordinator and workers (`lockstep.v1`), generated at
//! build time from `lockstep/v1/cluster.proto`, plus the little-endian codecs for the tensors
//! that travel in `bytes` fields.

pub mod client;
mod codec;
pub mod health;
mod model_state;
pub mod security;

/// Generated messages and service stubs of `lockstep.v1`.
pub mod v1 {
    tonic::include_proto!("lockstep.v1");
}

pub use codec::{CodecError, decode_f32, decode_u32, encode_f32, encode_u32};
pub use model_state::StateTensors;

/// Compatible revision of `lockstep.v1`; coordinator and worker must agree exactly. 3: a
/// session is opened with the registration's `session_secret`.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest message either side accepts: a chunked dataset file or the largest model's
/// parameters (mlp-dropout, 2.1 MB) fit with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window for every stream and connection. The default 64 KiB would make
/// each 0.4-2 MB tensor message wait for several window updates, a round trip each, which
/// dominates a step on loopback.
pub const WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// Largest HTTP/2 DATA frame either side accepts. The default 16 KiB cuts a 1.7 MB gradient
/// into over a hundred frames, each a trip through the HTTP/2 state machine on both sides.
pub const FRAME_BYTES: u32 = 1024 * 1024;
