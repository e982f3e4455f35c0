//! Helpers shared by the property tests and the benchmark: a small deterministic PRNG,
//! storage-type conversions, and the error metrics the tests check.

use cubecl::prelude::*;

/// Storage types the kernels are tested and benchmarked with (f32 accumulation for both).
pub trait StorageElem: Float + CubeElement + Copy {
    const NAME: &'static str;
    /// ‖out − ref‖ / ‖ref‖ bound for this storage type.
    const TOLERANCE: f64;
    fn round_from(v: f64) -> Self;
    fn as_f64(self) -> f64;
}

impl StorageElem for f32 {
    const NAME: &'static str = "f32";
    const TOLERANCE: f64 = 1e-5;
    fn round_from(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl StorageElem for half::bf16 {
    const NAME: &'static str = "bf16";
    const TOLERANCE: f64 = 1e-2;
    fn round_from(v: f64) -> Self {
        half::bf16::from_f64(v)
    }
    fn as_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
}

/// splitmix64: deterministic, seedable, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u32
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.next_u64() as usize % items.len()]
    }
    /// Uniform in ±[0.1, 1): random signs and magnitudes, never zero.
    pub fn value(&mut self) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mag = 0.1 + 0.9 * u;
        if self.next_u64() & 1 == 0 { mag } else { -mag }
    }
    /// `n` random values rounded to the storage type; returns (stored, exact f64 of stored).
    pub fn tensor<F: StorageElem>(&mut self, n: usize, scale: f64) -> (Vec<F>, Vec<f64>) {
        let stored: Vec<F> = (0..n).map(|_| F::round_from(self.value() * scale)).collect();
        let exact = stored.iter().map(|v| v.as_f64()).collect();
        (stored, exact)
    }
}

/// ‖out − ref‖₂ / ‖ref‖₂ over the given element pairs.
pub fn relative_error(pairs: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (out, reference) in pairs {
        num += (out - reference) * (out - reference);
        den += reference * reference;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}
