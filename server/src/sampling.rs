//! Choosing the next token on the host: greedy takes the engine's argmax; otherwise
//! temperature, top-k and top-p (nucleus) over the step's last-row logits, drawn from a
//! per-request generator so a seeded request gives the same tokens whatever it is batched with.

/// How a request picks its tokens and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    pub seed: Option<u64>,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// Generate past the end-of-sequence tokens (benchmarks; vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

impl SamplingParams {
    pub fn greedy(max_tokens: u32) -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None, max_tokens, stop: Vec::new(), ignore_eos: false }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// xoshiro256** seeded through SplitMix64: tiny, fast and reproducible across platforms,
/// which is all sampling needs (no cryptographic use).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// Seeded from the clock and a process-wide counter (unseeded requests).
    pub fn from_entropy() -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Rng::seeded(nanos ^ COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draws a token from `logits` (one row of the vocabulary) under `params`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    let temperature = f64::from(params.temperature.max(1e-5));
    let mut candidates: Vec<(u32, f64)> =
        logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, f64::from(l) / temperature)).collect();
    if candidates.is_empty() {
        return 0;
    }
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        candidates.truncate(params.top_k as usize);
    }
    let max = candidates[0].1;
    let mut total = 0.0;
    for c in &mut candidates {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    // Nucleus: the smallest prefix (by probability) whose mass reaches top_p.
    if params.top_p < 1.0 {
        let target = f64::from(params.top_p.max(0.0)) * total;
        let mut mass = 0.0;
        let mut keep = candidates.len();
        for (i, c) in candidates.iter().enumerate() {
            mass += c.1;
            if mass >= target {
                keep = i + 1;
                break;
            }
        }
        candidates.truncate(keep);
        total = candidates.iter().map(|c| c.1).sum();
    }
    let mut draw = rng.next_f64() * total;
    for &(id, p) in &candidates {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    candidates.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_draws_repeat_and_respect_top_k() {
        let logits = [0.1f32, 2.0, 1.5, -1.0, 0.7];
        let params = SamplingParams { temperature: 1.0, top_k: 2, seed: Some(7), ..SamplingParams::greedy(1) };
        let draws = |seed| {
            let mut rng = Rng::seeded(seed);
            (0..64).map(|_| sample(&logits, &params, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert!(draws(7).iter().all(|&t| t == 1 || t == 2));
        assert!(draws(7).contains(&1) && draws(7).contains(&2));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.1f32, 2.0, 1.5, -1.0];
        let params = SamplingParams { temperature: 1.0, top_p: 0.01, ..SamplingParams::greedy(1) };
        let mut rng = Rng::seeded(1);
        assert!((0..32).all(|_| sample(&logits, &params, &mut rng) == 1));
    }
}
