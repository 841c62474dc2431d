//! A tiny deterministic PRNG (xorshift) for randomized scenarios: a failure is replayed
//! from the seed the test prints. Not for anything but test workloads.

/// xorshift64; the state must not be 0 (use [`Rng::seeded`]).
pub struct Rng(pub u64);

impl Rng {
    /// A generator for `seed`, spread so neighbouring seeds differ from the first draw.
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
