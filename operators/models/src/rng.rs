//! A small deterministic random generator (splitmix64): demo rows and training draws must be
//! identical on every machine and version and resumable from one saved number, so they do not
//! depend on an external crate's algorithm.

/// Splitmix64's increment: the state after `n` draws is the state plus `n` times this.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Splitmix64 stream.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A stream for (`seed`, `key`).
    pub fn new(seed: u64, key: u64) -> Self {
        let mut rng = Rng(seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D);
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `lo..=hi`.
    pub fn int(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u32
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller, one draw per pair of uniforms so the stream is simple to
    /// resume).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// `n` standard normal draws in f32.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// Jumps over `n` draws of 64 bits, as if [`Rng::next_u64`] had been called `n` times, in
    /// constant time: lets a data-parallel trainer draw only its own rows' share of a stream.
    /// ([`Rng::unit`] and [`Rng::below`] take one draw, [`Rng::normal`] two.)
    ///
    /// ```
    /// use latentflow_models::rng::Rng;
    /// let (mut a, mut b) = (Rng::new(3, 4), Rng::new(3, 4));
    /// for _ in 0..5 { a.next_u64(); }
    /// b.skip(5);
    /// assert_eq!(a.next_u64(), b.next_u64());
    /// ```
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(GAMMA));
    }

    /// The whole state: `Rng::from_state(rng.state())` continues the same stream.
    pub fn state(&self) -> u64 {
        self.0
    }

    /// A stream continuing from a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }

    /// Shuffles `items` in place (Fisher-Yates from the end).
    ///
    /// ```
    /// let mut v = [1, 2, 3, 4];
    /// latentflow_models::rng::Rng::new(0, 0).shuffle(&mut v);
    /// v.sort_unstable();
    /// assert_eq!(v, [1, 2, 3, 4]);
    /// ```
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_continues_the_stream_and_normals_look_normal() {
        let mut a = Rng::new(7, 1);
        a.normal();
        let mut b = Rng::from_state(a.state());
        assert_eq!(a.normals(5), b.normals(5));
        let draws = a.normals(20_000);
        let mean = draws.iter().map(|&x| f64::from(x)).sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        assert!((0..100).all(|_| a.below(3) < 3));
    }
}
