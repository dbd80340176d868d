//! Batched generation: one prefill over padded prompts, then one token per row per step,
//! sampling each row with its own seeded generator so a row's text does not depend on the
//! batch it ran in.

use crate::batcher::{Batcher, Interventions, Sequence};
use crate::hooks::{Hooks, Intervention};
use crate::kv_cache::KvCache;
use crate::layers::log_softmax;
use crate::model::{Logits, Model};
use crate::thinking::ThinkingBudget;
use crate::{EngineError, Result};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Divides a positive logit (multiplies a negative one) of every token the row has
    /// already generated, so a repetition loop costs more each turn; 1 is off. Only the
    /// answer's own tokens count: a question's words are often the right words to answer with.
    pub repetition_penalty: f32,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pad before the prompt: every row's last prompt token is in the same slot.
    Left,
    /// Pad after the prompt.
    Right,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub padding: Padding,
    /// A reasoning model's thinking, budgeted apart from the answer.
    pub thinking: Option<ThinkingBudget>,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token was produced.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
    /// The caller's `on_token` asked to stop (a stop string was written, the client left).
    Halted,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop | Self::Halted => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated tokens, without the end-of-generation token.
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token under the model (temperature 1, no truncation).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
    /// The end-of-generation token that stopped the row, if any.
    pub stop_token: Option<u32>,
}

impl Generation {
    /// Mean log-probability of the answer's tokens (0 for an empty answer).
    pub fn mean_logprob(&self) -> f32 {
        if self.logprobs.is_empty() {
            0.0
        } else {
            (self.logprobs.iter().map(|&l| l as f64).sum::<f64>() / self.logprobs.len() as f64)
                as f32
        }
    }
}

/// Picks the next token from `logits`, given the tokens the row has generated so far;
/// returns it with its log-probability under the unpenalised `logits`.
pub fn sample(
    logits: &[f32],
    generated: &[u32],
    sampling: &Sampling,
    rng: &mut StdRng,
) -> (u32, f32) {
    let logprobs = log_softmax(logits);
    let penalised = penalise_repeats(logits, generated, sampling.repetition_penalty);
    let logits = penalised.as_deref().unwrap_or(logits);
    let argmax = || {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best
    };
    let chosen = if sampling.temperature <= 0.0 {
        argmax()
    } else {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if sampling.top_k > 0 {
            order.truncate(sampling.top_k);
        }
        let max = logits[order[0]] as f64;
        let t = sampling.temperature as f64;
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        if sampling.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = weights.len();
            for (n, w) in weights.iter().enumerate() {
                cumulative += w / total;
                if cumulative >= sampling.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut target = rng.gen::<f64>() * total;
        let mut pick = order[weights.len() - 1];
        for (n, w) in weights.iter().enumerate() {
            if target < *w {
                pick = order[n];
                break;
            }
            target -= w;
        }
        pick
    };
    (chosen as u32, logprobs[chosen] as f32)
}

/// `logits` with every token of `generated` penalised once; None when nothing changes.
fn penalise_repeats(logits: &[f32], generated: &[u32], penalty: f32) -> Option<Vec<f32>> {
    if penalty == 1.0 || generated.is_empty() {
        return None;
    }
    let mut penalised = logits.to_vec();
    let mut seen = generated.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for t in seen {
        if let Some(x) = penalised.get_mut(t as usize) {
            *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
        }
    }
    Some(penalised)
}

/// Runs the prompts through the model as one padded batch, leaving room in the cache for
/// `room` more tokens per row; returns the cache and the `logits` asked for.
pub fn prefill(
    model: &Model,
    prompts: &[&[u32]],
    padding: Padding,
    room: usize,
    hooks: &mut Hooks,
    logits: Logits,
) -> Result<(KvCache, Tensor)> {
    check_prompts(model, prompts, room)?;
    let batch = prompts.len();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut tokens = vec![0u32; batch * longest];
    let mut valid = vec![false; batch * longest];
    for (row, prompt) in prompts.iter().enumerate() {
        let offset = match padding {
            Padding::Left => longest - prompt.len(),
            Padding::Right => 0,
        };
        for (i, &t) in prompt.iter().enumerate() {
            tokens[row * longest + offset + i] = t;
            valid[row * longest + offset + i] = true;
        }
    }
    let mut cache = model.new_cache(batch, longest + room);
    let chunk = cache.begin(valid, longest, true)?;
    let logits = model.forward(&tokens, &chunk, &mut cache, hooks, logits)?;
    Ok((cache, logits))
}

/// No prompt is empty, and the longest leaves `room` in the context.
fn check_prompts(model: &Model, prompts: &[&[u32]], room: usize) -> Result<()> {
    if let Some(r) = prompts.iter().position(|p| p.is_empty()) {
        return Err(EngineError::Batch(format!(
            "prompt {r} is empty: there is nothing to run"
        )));
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let context = model.config.context_length;
    if longest + room > context {
        return Err(EngineError::ContextLength {
            prompt: longest,
            new_tokens: room,
            context,
        });
    }
    Ok(())
}

/// The tokens every prompt of a job opens with (a chat template's system turn and user
/// header), run once: each batch copies their keys and values instead of computing them.
/// Hooks do not see the copied tokens, so a row whose hooks reach into the opening (steering
/// at every prompt position) copies the opening run under those hooks ([`SharedPrefix::steered`]).
pub struct SharedPrefix {
    tokens: Vec<u32>,
    cache: KvCache,
}

impl SharedPrefix {
    /// The opening `a` and `b` share (two prompts formatted from different texts), run
    /// once; `None` when they share nothing.
    pub fn common(model: &Model, a: &[u32], b: &[u32]) -> Result<Option<Self>> {
        let tokens = a[..common_len(a, b)].to_vec();
        if tokens.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self::run(model, tokens, &[])?))
    }

    /// This opening run again under the interventions of `steering` that reach openings:
    /// copied into a row steered so, it holds exactly what the row would compute itself.
    pub fn steered(&self, model: &Model, steering: &[Intervention]) -> Result<Self> {
        let reaching: Vec<Intervention> = steering
            .iter()
            .filter(|iv| iv.positions.reach_openings())
            .cloned()
            .collect();
        Self::run(model, self.tokens.clone(), &reaching)
    }

    fn run(model: &Model, tokens: Vec<u32>, interventions: &[Intervention]) -> Result<Self> {
        let mut hooks = model.hooks_with(interventions)?;
        let (cache, _) = prefill(
            model,
            &[&tokens],
            Padding::Left,
            0,
            &mut hooks,
            Logits::Last,
        )?;
        Ok(Self { tokens, cache })
    }

    /// What [`prefill`] (left padding) returns for `prompts`, the opening they all share
    /// with this prefix copied in rather than recomputed; every row keeps at least its last
    /// token to run. Prompts that do not open with it simply share less (or nothing).
    pub fn prefill(
        &self,
        model: &Model,
        prompts: &[&[u32]],
        room: usize,
        hooks: &mut Hooks,
        logits: Logits,
    ) -> Result<(KvCache, Tensor)> {
        prefill_after(
            model,
            &vec![self; prompts.len()],
            prompts,
            room,
            hooks,
            logits,
        )
    }
}

/// [`SharedPrefix::prefill`] with each row's opening copied from its own prefix: one opening,
/// run under each row's steering.
pub(crate) fn prefill_after(
    model: &Model,
    openings: &[&SharedPrefix],
    prompts: &[&[u32]],
    room: usize,
    hooks: &mut Hooks,
    logits: Logits,
) -> Result<(KvCache, Tensor)> {
    check_prompts(model, prompts, room)?;
    let Some(first) = openings.first() else {
        return prefill(model, prompts, Padding::Left, room, hooks, logits);
    };
    if openings.len() != prompts.len() || openings.iter().any(|o| o.tokens != first.tokens) {
        return Err(EngineError::Batch(format!(
            "{} openings for {} prompts: every row needs one, all of the same tokens",
            openings.len(),
            prompts.len()
        )));
    }
    let shared = prompts
        .iter()
        .map(|p| common_len(p, &first.tokens).min(p.len() - 1))
        .min()
        .unwrap_or(0);
    if shared == 0 {
        return prefill(model, prompts, Padding::Left, room, hooks, logits);
    }
    let batch = prompts.len();
    let longest = prompts.iter().map(|p| p.len() - shared).max().unwrap_or(0);
    let caches: Vec<&KvCache> = openings.iter().map(|o| &o.cache).collect();
    let mut cache = KvCache::from_prefixes(&caches, shared, shared + longest + room)?;
    // Left padding between the shared opening and each row's own tokens: padding slots
    // are never attended to and positions count real tokens only.
    let mut tokens = vec![0u32; batch * longest];
    let mut valid = vec![false; batch * longest];
    for (row, prompt) in prompts.iter().enumerate() {
        let own = &prompt[shared..];
        let offset = row * longest + longest - own.len();
        tokens[offset..offset + own.len()].copy_from_slice(own);
        valid[offset..offset + own.len()].fill(true);
    }
    let chunk = cache.begin(valid, longest, true)?;
    let logits = model.forward(&tokens, &chunk, &mut cache, hooks, logits)?;
    Ok((cache, logits))
}

/// How many leading tokens `a` and `b` share.
fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One generated token, as [`generate`] shows it to its caller.
#[derive(Debug, Clone, Copy)]
pub struct Sampled<'a> {
    pub row: usize,
    pub token: u32,
    /// Its log-probability (as in [`Generation::logprobs`]).
    pub logprob: f32,
    /// The row's logits it was sampled from, before any penalty (for top log-probabilities).
    pub logits: &'a [f32],
}

/// What the caller of [`generate`] wants after seeing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// End this row after the token ([`FinishReason::Halted`]).
    Halt,
}

/// Generates a continuation for each request, all prefilled as one batch and steered alike
/// (or not at all); each row leaves the batch as soon as it finishes. `on_token` sees every
/// generated token as it is sampled (its `row` is the request's index) and may end its row.
pub fn generate(
    model: &Model,
    requests: &[Request],
    options: &GenerateOptions,
    steering: Option<&Interventions>,
    on_token: &mut dyn FnMut(Sampled<'_>) -> Flow,
) -> Result<Vec<Generation>> {
    let mut batcher = Batcher::new(model);
    let sequences = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let sequence = Sequence {
                prompt: r.prompt.clone(),
                seed: r.seed,
                sampling: options.sampling,
                max_new_tokens: options.max_new_tokens,
                steering: steering.cloned(),
                thinking: options.thinking.clone(),
                ignore_eos: false,
            };
            (i, sequence)
        })
        .collect();
    batcher.admit(sequences, options.padding)?;
    let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
    while !batcher.is_empty() {
        let finished = batcher.step(&mut |&i, seen| on_token(Sampled { row: i, ..seen }))?;
        for (i, generation) in finished {
            out[i] = Some(generation);
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every admitted row finishes"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = StdRng::seed_from_u64(0);
        let (t, lp) = sample(&[1.0, 3.0, 3.0, -1.0], &[], &Sampling::GREEDY, &mut rng);
        assert_eq!(t, 1);
        assert!(lp < 0.0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 1,
            repetition_penalty: 1.0,
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            sample(&logits, &[], &s, &mut rng).0,
            sample(&logits, &[], &Sampling::GREEDY, &mut rng).0
        );
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            repetition_penalty: 1.0,
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, &[], &s, &mut rng).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_never_picks_outside_the_nucleus() {
        // One token holds ~88% of the mass: with top_p 0.5 it is the only candidate.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            repetition_penalty: 1.0,
        };
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..100).all(|_| sample(&logits, &[], &s, &mut rng).0 == 0));
    }

    #[test]
    fn the_repetition_penalty_turns_greedy_away_from_tokens_already_generated() {
        let logits = [2.0, 1.9, -1.0, -1.05];
        let s = Sampling {
            repetition_penalty: 1.5,
            ..Sampling::GREEDY
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(sample(&logits, &[], &s, &mut rng).0, 0);
        let (token, logprob) = sample(&logits, &[0], &s, &mut rng);
        assert_eq!(token, 1);
        // The log-probability is the model's, not the penalised one.
        assert!((f64::from(logprob) - log_softmax(&logits)[1]).abs() < 1e-6);
        // A negative logit is pushed further down, not up towards zero.
        assert_eq!(sample(&[-1.0, -1.05], &[0], &s, &mut rng).0, 1);
        assert_eq!(
            sample(&[-1.0, -1.05], &[0], &Sampling::GREEDY, &mut rng).0,
            0
        );
    }
}
