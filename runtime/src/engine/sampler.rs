//! Token sampling: penalties, temperature, top-k, top-p (nucleus), with a reproducible seeded PRNG.
//!
//! Order of operations in [`Sampler::sample`] (as in vLLM):
//! 1. repetition penalty over the distinct ids of prompt and generated text (HF/vLLM: `logit > 0 ? logit / p :
//!    logit * p`);
//! 2. frequency and presence penalties over the generated ids (OpenAI: `logit -= f * count + p * (count > 0)`);
//!    then `logit_bias` (OpenAI: the bias is added to the token's logit; -100 bans it, 100 all but forces it);
//! 3. temperature 0 → greedy argmax (lowest index wins ties; the RNG is not touched);
//! 4. otherwise `logit / temperature`, keep the `top_k` largest, keep the smallest prefix of the descending
//!    softmax whose mass reaches `top_p` (at least one token), and draw from the renormalized distribution.
//!
//! Randomness comes from our own xoshiro256** generator seeded through SplitMix64, so a given seed yields the same
//! ids on every platform and across dependency upgrades.

use crate::error::{Error, Part, Result};

/// The temperature a request gets when it names none: OpenAI's default (1, plain sampling). `greedy()` is the
/// explicit 0.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// Per-request sampling parameters (OpenAI / vLLM semantics), as a caller builds them; [`SamplingParams::validate`]
/// checks them once and turns them into the [`ValidSampling`] the engine takes.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 ⇒ greedy (argmax, lowest index wins ties). Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 ⇒ off.
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1]; 1.0 ⇒ off.
    pub top_p: f32,
    /// `Some` ⇒ reproducible: the same seed and the same logits give the same ids.
    pub seed: Option<u64>,
    /// HF/vLLM repetition penalty over prompt and generated ids; 1.0 ⇒ off; must be > 0.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty over generated ids, in [-2, 2].
    pub frequency_penalty: f32,
    /// OpenAI presence penalty over generated ids, in [-2, 2].
    pub presence_penalty: f32,
    /// Extra ids that end generation (besides the tokenizer's EOS ids, which the engine checks itself).
    pub stop_token_ids: Vec<u32>,
    /// (token id, bias) pairs added to the logits before sampling; each bias in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature [`DEFAULT_TEMPERATURE`], every filter and penalty off.
    fn default() -> Self {
        Self {
            temperature: DEFAULT_TEMPERATURE,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop_token_ids: Vec::new(),
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0) without penalties.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks every parameter's range, once: the error names the parameter and the allowed range.
    pub fn validate(self) -> Result<ValidSampling> {
        self.check()?;
        Ok(ValidSampling(self))
    }

    fn check(&self) -> Result<()> {
        let invalid = |param: &'static str, range: &str, value: f32| {
            Err(Error::InvalidParam { param, reason: format!("must be {range}, got {value}") })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid("temperature", "finite and >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", "in (0, 1]", self.top_p);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid("repetition_penalty", "finite and > 0", self.repetition_penalty);
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return invalid("frequency_penalty", "in [-2, 2]", self.frequency_penalty);
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return invalid("presence_penalty", "in [-2, 2]", self.presence_penalty);
        }
        if let Some(&(_, bias)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return invalid("logit_bias", "a map of token ids to biases in [-100, 100]", bias);
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Sampling parameters whose ranges [`SamplingParams::validate`] checked: what a request carries to the engine, so
/// nothing downstream checks them again.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSampling(SamplingParams);

impl ValidSampling {
    /// Greedy decoding without penalties (valid by construction).
    pub fn greedy() -> Self {
        Self(SamplingParams::greedy())
    }
}

impl std::ops::Deref for ValidSampling {
    type Target = SamplingParams;

    fn deref(&self) -> &SamplingParams {
        &self.0
    }
}

/// xoshiro256** (Blackman & Vigna), state seeded from a u64 through SplitMix64.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    fn next_u64(&mut self) -> u64 {
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

    /// Uniform in [0, 1) with 53 bits of precision.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seed from OS-provided hash randomness mixed with the clock, for requests without a seed.
fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish()
}

/// Samples next tokens for one request; owns the parameters and the request's RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: ValidSampling,
    rng: Xoshiro256,
}

impl Sampler {
    /// A `None` seed draws one from OS entropy and the clock.
    pub fn new(params: ValidSampling) -> Self {
        let seed = params.seed.unwrap_or_else(entropy_seed);
        Self { params, rng: Xoshiro256::seed_from_u64(seed) }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one id from a logits row. `prompt` and `generated` feed the penalties; ids outside the vocabulary
    /// are ignored there. Fails when `logits` is empty or holds no finite value after penalties.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::internal(Part::Sampler, "cannot sample from an empty logits row"));
        }
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, prompt, generated);
        let best = argmax(&logits)
            .ok_or_else(|| Error::internal(Part::Sampler, "logits hold no finite value to sample from"))?;
        if self.params.is_greedy() {
            return Ok(best as u32);
        }
        Ok(self.sample_stochastic(&logits, best) as u32)
    }

    /// Whether `id` is one of the request's `stop_token_ids`.
    pub fn is_stop_token(&self, id: u32) -> bool {
        self.params.stop_token_ids.contains(&id)
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        let n = logits.len();
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; n];
            for &id in prompt.iter().chain(generated) {
                let i = id as usize;
                if i < n && !seen[i] {
                    seen[i] = true;
                    let l = logits[i];
                    logits[i] = if l > 0.0 { l / p.repetition_penalty } else { l * p.repetition_penalty };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<usize, u32>::new();
            for &id in generated {
                if (id as usize) < n {
                    *counts.entry(id as usize).or_default() += 1;
                }
            }
            for (i, count) in counts {
                logits[i] -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
        for &(id, bias) in &p.logit_bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
    }

    /// Temperature, top-k, top-p, then one draw. `best` is the argmax (the fallback for rounding at the end).
    fn sample_stochastic(&mut self, logits: &[f32], best: usize) -> usize {
        let p = &self.params;
        let inv_t = 1.0 / f64::from(p.temperature);
        let max = f64::from(logits[best]);
        // Candidates as (index, logit); non-finite-low logits (-inf, NaN) can never be drawn.
        let mut cand: Vec<(usize, f32)> =
            logits.iter().copied().enumerate().filter(|(_, l)| *l > f32::NEG_INFINITY).collect();
        let desc = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let needs_sort = p.top_p < 1.0;
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        if needs_sort {
            cand.sort_unstable_by(desc);
        }
        let mut weights: Vec<f64> = cand.iter().map(|&(_, l)| ((f64::from(l) - max) * inv_t).exp()).collect();
        if needs_sort {
            let total: f64 = weights.iter().sum();
            let target = f64::from(p.top_p) * total;
            let mut cum = 0.0;
            let mut keep = weights.len();
            for (i, w) in weights.iter().enumerate() {
                cum += w;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            weights.truncate(keep.max(1));
            cand.truncate(keep.max(1));
        }
        let total: f64 = weights.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return best;
        }
        let mut u = self.rng.next_f64() * total;
        for (&(i, _), w) in cand.iter().zip(&weights) {
            if u < *w {
                return i;
            }
            u -= w;
        }
        // Only reachable through rounding: take the last candidate with weight.
        cand.iter().zip(&weights).rev().find(|(_, w)| **w > 0.0).map_or(best, |(c, _)| c.0)
    }
}

/// Index of the largest logit, lowest index on ties; NaN never wins. `None` when nothing beats -inf.
fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i)
}

/// Numerically stable log-softmax of a logits row (f64 accumulation), for logprobs.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // All -inf (or +inf present): fall back to the plain formula, which yields NaN/-inf as appropriate.
        let lse = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        return logits.iter().map(|&l| (f64::from(l) - lse) as f32).collect();
    }
    let max = f64::from(max);
    let lse = max + logits.iter().map(|&l| (f64::from(l) - max).exp()).sum::<f64>().ln();
    logits.iter().map(|&l| (f64::from(l) - lse) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params.validate().unwrap())
    }

    fn sampling(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() }
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_index_on_ties() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, f32::NAN], &[], &[]).unwrap(), 1);
    }

    #[test]
    fn greedy_does_not_touch_the_rng() {
        let mut s = sampler(SamplingParams { seed: Some(7), ..SamplingParams::greedy() });
        let before = s.rng.s;
        s.sample(&[0.0, 1.0], &[], &[]).unwrap();
        assert_eq!(s.rng.s, before);
    }

    #[test]
    fn same_seed_and_logits_give_same_ids() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let draw = |seed| {
            let mut s = sampler(SamplingParams { top_p: 0.9, top_k: 20, ..sampling(1.0, seed) });
            (0..100).map(|_| s.sample(&logits, &[], &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn xoshiro_matches_reference_sequence() {
        // Pin the generator: changing it would silently change every seeded request's output.
        let mut rng = Xoshiro256::seed_from_u64(0);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        let mut again = Xoshiro256::seed_from_u64(0);
        assert_eq!(first, (0..3).map(|_| again.next_u64()).collect::<Vec<_>>());
        // SplitMix64(0) first output is the well-known 0xE220A8397B1DCDAF.
        assert_eq!(Xoshiro256::seed_from_u64(0).s[0], 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits = [0.3, 1.2, 1.1, -0.5, 1.19];
        let mut s = sampler(SamplingParams { top_k: 1, ..sampling(2.0, 1) });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits, &[], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        let logits = [0.3, 1.2, 1.1, -0.5, 1.19];
        let mut s = sampler(SamplingParams { top_p: 1e-6, ..sampling(5.0, 3) });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits, &[], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_restricts_to_the_k_largest() {
        let logits = [0.0, 5.0, 4.9, 4.8, 0.1];
        let mut s = sampler(SamplingParams { top_k: 2, ..sampling(100.0, 9) });
        for _ in 0..500 {
            let id = s.sample(&logits, &[], &[]).unwrap();
            assert!(id == 1 || id == 2, "{id}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
        // probs ≈ [0.5, 0.3, 0.2] (logits = ln p); top_p 0.7 keeps {0, 1}.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = sampler(SamplingParams { top_p: 0.7, ..sampling(1.0, 5) });
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            seen[s.sample(&logits, &[], &[]).unwrap() as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 0 && seen[1] > 0);
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        let logits = [1.0f32, 2.0, 0.5];
        let temperature = 0.8f32;
        let scaled: Vec<f32> = logits.iter().map(|l| l / temperature).collect();
        let expected: Vec<f64> = log_softmax(&scaled).iter().map(|l| f64::from(*l).exp()).collect();
        let n = 20_000;
        let mut s = sampler(sampling(temperature, 1234));
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits, &[], &[]).unwrap() as usize] += 1;
        }
        for (c, p) in counts.iter().zip(&expected) {
            let freq = *c as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!((freq - p).abs() < tol, "freq {freq} vs p {p} (tol {tol})");
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let s = sampler(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() });
        let mut logits = vec![4.0, -1.0, 3.0, 1.0];
        // Repeated ids are penalized once; prompt and generated ids both count.
        s.apply_penalties(&mut logits, &[0, 0], &[1, 1, 1]);
        assert_eq!(logits, vec![2.0, -2.0, 3.0, 1.0]);
        let mut greedy = sampler(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() });
        assert_eq!(greedy.sample(&[4.0, -1.0, 3.0, 1.0], &[0], &[]).unwrap(), 2);
    }

    #[test]
    fn frequency_penalty_scales_with_generated_count_only() {
        let s = sampler(SamplingParams { frequency_penalty: 0.5, ..SamplingParams::greedy() });
        let mut logits = vec![1.0, 1.0, 1.0];
        s.apply_penalties(&mut logits, &[2, 2, 2], &[0, 0, 0, 1]);
        assert_eq!(logits, vec![-0.5, 0.5, 1.0]);
    }

    #[test]
    fn presence_penalty_applies_once_per_generated_id() {
        let s = sampler(SamplingParams { presence_penalty: -1.5, ..SamplingParams::greedy() });
        let mut logits = vec![1.0, 1.0, 1.0];
        s.apply_penalties(&mut logits, &[2], &[0, 0, 0, 1, 7]);
        assert_eq!(logits, vec![2.5, 2.5, 1.0]);
    }

    #[test]
    fn logit_bias_is_added_after_the_penalties_and_can_ban_or_force_a_token() {
        let s = sampler(SamplingParams {
            presence_penalty: 1.0,
            logit_bias: vec![(0, -100.0), (2, 5.0), (99, 100.0)],
            ..SamplingParams::greedy()
        });
        let mut logits = vec![3.0, 1.0, 1.0];
        s.apply_penalties(&mut logits, &[], &[2]);
        assert_eq!(logits, vec![-97.0, 1.0, 5.0], "ids outside the vocabulary are skipped");
        let mut s = sampler(SamplingParams { logit_bias: vec![(1, 100.0)], ..sampling(1.0, 4) });
        assert!((0..50).all(|_| s.sample(&[2.0, 0.0, 1.0], &[], &[]).unwrap() == 1));
    }

    #[test]
    fn invalid_params_are_rejected_naming_the_parameter() {
        let cases = [
            (SamplingParams { temperature: -0.1, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::INFINITY, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.01, ..Default::default() }, "top_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { frequency_penalty: 2.5, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { presence_penalty: -2.01, ..Default::default() }, "presence_penalty"),
            (SamplingParams { logit_bias: vec![(1, 100.5)], ..Default::default() }, "logit_bias"),
            (SamplingParams { logit_bias: vec![(1, f32::NAN)], ..Default::default() }, "logit_bias"),
        ];
        for (params, name) in cases {
            let err = params.validate().unwrap_err();
            assert!(matches!(&err, Error::InvalidParam { param, .. } if *param == name), "{err:?}");
            assert!(err.to_string().starts_with(&format!("`{name}` must be")), "{err}");
        }
        assert!(SamplingParams { top_p: 1.0, frequency_penalty: -2.0, ..Default::default() }.validate().is_ok());
    }

    #[test]
    fn empty_or_all_masked_logits_are_errors() {
        let mut s = sampler(SamplingParams::greedy());
        assert!(s.sample(&[], &[], &[]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY, f32::NAN], &[], &[]).is_err());
    }

    #[test]
    fn masked_tokens_are_never_sampled() {
        let mut s = sampler(sampling(1.0, 11));
        for _ in 0..500 {
            assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], &[], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn stop_tokens_are_recognised() {
        let s = sampler(SamplingParams { stop_token_ids: vec![5, 9], ..Default::default() });
        assert!(s.is_stop_token(9));
        assert!(!s.is_stop_token(6));
    }

    #[test]
    fn log_softmax_is_stable_and_normalized() {
        let out = log_softmax(&[1000.0, 1000.0, f32::NEG_INFINITY]);
        assert!((out[0] - (-std::f32::consts::LN_2)).abs() < 1e-6);
        assert_eq!(out[2], f32::NEG_INFINITY);
        let out = log_softmax(&[0.1, -3.0, 2.5, 0.0]);
        let sum: f64 = out.iter().map(|l| f64::from(*l).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
