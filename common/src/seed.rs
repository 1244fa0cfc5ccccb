use rand_chacha::{ChaCha8Rng, rand_core::SeedableRng};
use sha2::{Digest, Sha256};

/// A random generator for one purpose of one job, independent of every other purpose.
///
/// Everything random in a job (the epoch's sample order, parameter initialisation, dropout
/// masks) draws from a stream keyed by the job seed, a purpose name and a few integers, so that
/// runs repeat bit for bit and no two uses share a stream by accident. ChaCha8's output is fixed
/// by its specification, so the streams also survive dependency upgrades.
pub fn derive_rng(seed: u64, purpose: &str, parts: &[u64]) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update((purpose.len() as u64).to_le_bytes());
    hasher.update(purpose.as_bytes());
    for part in parts {
        hasher.update(part.to_le_bytes());
    }
    ChaCha8Rng::from_seed(hasher.finalize().into())
}

/// A 64-bit seed for one purpose, for APIs that take a plain integer.
pub fn derive_seed(seed: u64, purpose: &str, parts: &[u64]) -> u64 {
    use rand_chacha::rand_core::RngCore;
    derive_rng(seed, purpose, parts).next_u64()
}
