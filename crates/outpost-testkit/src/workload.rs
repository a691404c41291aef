//! Deterministic workload data for tests and benches: a small PRNG, blobs
//! as a pure function of a seed, SHA-256 digests computed here (never by the
//! code under test) and batch packing.

use sha2::{Digest as _, Sha256};

use crate::re;

/// Bytes a Batch* entry costs beyond its data (digest, status, framing), so
/// that packed batches stay under the server's limit.
pub const BATCH_ENTRY_OVERHEAD: u64 = 100;

/// xorshift64*: fast, deterministic, incompressible enough for a cache that
/// does not compress.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(mix(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Log-uniform in [lo, hi).
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        (a + self.unit() * (b - a)).exp() as u64
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.fill(&mut out);
        out
    }
}

/// splitmix64 finaliser: turns structured seeds into independent ones.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `len` pseudo-random bytes: a pure function of `seed` and `len`; different
/// seeds give different blobs.
pub fn blob(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The REAPI (SHA-256) digest of `data`.
pub fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: sha256_hex(data),
        size_bytes: data.len() as i64,
    }
}

/// Splits `items` into batches whose total `size` (plus
/// [`BATCH_ENTRY_OVERHEAD`] per entry) stays within `max_batch`; an item
/// larger than that gets a batch of its own.
pub fn pack<T>(items: Vec<T>, max_batch: u64, size: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut batches: Vec<Vec<T>> = vec![Vec::new()];
    let mut total = 0u64;
    for item in items {
        let n = size(&item) + BATCH_ENTRY_OVERHEAD;
        if total + n > max_batch && !batches.last().expect("never empty").is_empty() {
            batches.push(Vec::new());
            total = 0;
        }
        total += n;
        batches.last_mut().expect("never empty").push(item);
    }
    batches.retain(|b| !b.is_empty());
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_keeps_batches_under_the_limit_and_order() {
        let batches = pack((0..10u64).collect(), 350, |_| 50);
        assert_eq!(
            batches,
            vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7], vec![8, 9]]
        );
        assert_eq!(pack(vec![1000u64], 10, |n| *n), vec![vec![1000]]);
    }

    #[test]
    fn blobs_are_deterministic_and_distinct() {
        assert_eq!(blob(7, 100), blob(7, 100));
        assert_ne!(blob(7, 100), blob(8, 100));
        assert_eq!(blob(7, 13).len(), 13);
    }
}
