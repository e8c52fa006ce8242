//! A small seeded random number generator (SplitMix64) and Gaussian draws (Box–Muller).
//!
//! The simulator must be reproducible bit for bit from a seed on any machine and thread
//! count, so it carries its own generator rather than depending on a crate whose stream
//! might change between versions. Parallel noise uses one stream per fixed-size chunk,
//! seeded from (seed, echo, chunk), so the result does not depend on scheduling.

/// SplitMix64: tiny, fast, and good enough for simulation noise and phantom jitter.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Scramble once so that neighbouring seeds give unrelated streams from the start.
        Rng { state: mix(seed) }
    }

    /// A stream derived from a seed and a path of integers (e.g. subject, echo, chunk).
    pub fn derived(seed: u64, path: &[u64]) -> Self {
        let mut s = mix(seed);
        for &p in path {
            s = mix(s ^ mix(p.wrapping_add(0x632b_e59b_d9b4_e019)));
        }
        Rng { state: s }
    }

    /// The generator's whole state: [`Rng::from_state`] continues the same stream.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// A pair of independent standard normal draws (Box–Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        // 1 − u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        (r * t.cos(), r * t.sin())
    }

    /// One standard normal draw (the first of a Box–Muller pair).
    pub fn normal(&mut self) -> f64 {
        self.normal_pair().0
    }
}

/// `n` values uniform in [−0.5, 0.5) from `seed`: test input for the numerical kernels.
pub fn centred_noise(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform() as f32 - 0.5).collect()
}

/// The SplitMix64 output function, also used to hash seeds.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_different_seeds_differ() {
        let a: Vec<u64> = (0..8).map(|_| Rng::new(5).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = Rng::new(5);
        let mut y = Rng::new(6);
        assert!((0..8).any(|_| x.next_u64() != y.next_u64()));
        let mut p = Rng::derived(1, &[2, 3]);
        let mut q = Rng::derived(1, &[3, 2]);
        assert_ne!(p.next_u64(), q.next_u64());
    }

    #[test]
    fn normal_draws_have_unit_variance() {
        let mut r = Rng::new(42);
        let n = 200_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n / 2 {
            let (a, b) = r.normal_pair();
            s += a + b;
            s2 += a * a + b * b;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
