//! Continuous batching: sequences join a running batch between decode steps and leave it the
//! step they finish, each with its own steering, sampling settings and token budget.
//!
//! Invariants: every running sequence is one row of one rectangular cache (see
//! [`KvCache::gather`]: joining and leaving only moves slots, so a row computes what it
//! would compute alone, to the kernels' batch invariance); a sequence's steering acts on its
//! own row only; a row's random generator is seeded by its sequence alone, so its text does not
//! depend on what shares its batch. A finished row costs nothing after the step it finishes.

use crate::generate::{
    prefill, prefill_after, sample, FinishReason, Flow, Generation, Padding, Sampled, Sampling,
};
use crate::hooks::{Hooks, Intervention, Rows};
use crate::kv_cache::KvCache;
use crate::layers::log_softmax;
use crate::model::{Logits, Model};
use crate::thinking::{Thinking, ThinkingBudget};
use crate::{EngineError, Result, SharedPrefix};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;

/// The interventions that steer one sequence. Their `rows` must be [`Rows::All`]: the batcher
/// restricts them to the sequence's row.
pub type Interventions = Arc<[Intervention]>;

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub seed: u64,
    pub sampling: Sampling,
    /// The answer's budget; with `thinking`, the reasoning has its own besides.
    pub max_new_tokens: usize,
    pub steering: Option<Interventions>,
    pub thinking: Option<ThinkingBudget>,
    /// Generate the whole budget: an end-of-generation token is kept as an ordinary token
    /// (load benchmarks compare servers on answers of equal length).
    pub ignore_eos: bool,
}

impl Sequence {
    /// The most tokens the sequence may generate, reasoning included.
    fn token_budget(&self) -> usize {
        self.thinking
            .as_ref()
            .map_or(self.max_new_tokens, |b| b.total(self.max_new_tokens))
    }
}

struct Running<K> {
    key: K,
    sequence: Sequence,
    rng: StdRng,
    generation: Generation,
    /// The logits the next token is sampled from.
    logits: Vec<f32>,
    thinking: Option<Thinking>,
}

impl<K> Running<K> {
    /// Tokens of the answer so far: those outside the reasoning.
    fn answer_len(&self) -> usize {
        self.generation.tokens.len() - self.thinking.as_ref().map_or(0, |t| t.reasoning_tokens())
    }
}

/// A running batch. `K` is how the caller names its sequences.
pub struct Batcher<'m, K> {
    model: &'m Model,
    running: Vec<Running<K>>,
    /// Row `i` is `running[i]`; `None` while nothing runs.
    cache: Option<KvCache>,
    /// The running rows' steering, each restricted to its rows.
    hooks: Hooks,
    prefix: Option<&'m SharedPrefix>,
    /// `prefix` run under each steering that reaches into it, the most recent first.
    steered_prefixes: Vec<(Interventions, SharedPrefix)>,
}

/// Steered openings kept: a server's recipes at the scales in use; an older one is run again
/// when it comes back.
const STEERED_PREFIXES: usize = 8;

impl<'m, K> Batcher<'m, K> {
    pub fn new(model: &'m Model) -> Self {
        Self {
            model,
            running: Vec::new(),
            cache: None,
            hooks: model.new_hooks(),
            prefix: None,
            steered_prefixes: Vec::new(),
        }
    }

    /// Joining sequences copy `prefix` (a chat template's opening) instead of computing it;
    /// one whose steering reaches into the opening copies it as run under that steering.
    pub fn with_shared_prefix(mut self, prefix: Option<&'m SharedPrefix>) -> Self {
        self.prefix = prefix;
        self
    }

    /// Sequences running now.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Drops every running sequence: after a failed step their rows cannot go on.
    pub fn clear(&mut self) {
        self.running.clear();
        self.cache = None;
        self.hooks = self.model.new_hooks();
    }

    /// Checks each sequence on its own, so a caller can refuse one without losing the others.
    pub fn check(&self, sequence: &Sequence) -> Result<()> {
        if sequence.prompt.is_empty() {
            return Err(EngineError::Batch(
                "the prompt is empty: there is nothing to run".into(),
            ));
        }
        let context = self.model.config.context_length;
        if sequence.prompt.len() + sequence.token_budget() > context {
            return Err(EngineError::ContextLength {
                prompt: sequence.prompt.len(),
                new_tokens: sequence.token_budget(),
                context,
            });
        }
        if let Some(steering) = &sequence.steering {
            if let Some(iv) = steering.iter().find(|iv| iv.rows != Rows::All) {
                return Err(EngineError::BadIntervention(format!(
                    "a sequence's steering applies to its own row; the intervention at point {} \
                     names rows {:?}",
                    iv.point, iv.rows
                )));
            }
            self.model.hooks_with(steering)?;
        }
        Ok(())
    }

    /// Runs the prompts of `sequences` as one batch (`padding` as in [`prefill`]) and adds them
    /// to the running rows; their first tokens come with the next [`Batcher::step`]. On an
    /// error nothing is admitted and the running rows go on.
    pub fn admit(&mut self, sequences: Vec<(K, Sequence)>, padding: Padding) -> Result<()> {
        if sequences.is_empty() {
            return Ok(());
        }
        for (_, s) in &sequences {
            self.check(s)?;
        }
        let prompts: Vec<&[u32]> = sequences.iter().map(|(_, s)| s.prompt.as_slice()).collect();
        let mut hooks = self.hooks_for(sequences.iter().map(|(_, s)| s))?;
        let model = self.model;
        let (joining, logits) = match self.openings(sequences.iter().map(|(_, s)| s), padding)? {
            Some(openings) => {
                prefill_after(model, &openings, &prompts, 0, &mut hooks, Logits::Last)?
            }
            None => prefill(model, &prompts, padding, 0, &mut hooks, Logits::Last)?,
        };
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let new: Vec<Running<K>> = sequences
            .into_iter()
            .zip(logits)
            .map(|((key, sequence), logits)| Running {
                key,
                rng: StdRng::seed_from_u64(sequence.seed),
                thinking: sequence
                    .thinking
                    .clone()
                    .map(|b| Thinking::start(b, &sequence.prompt)),
                sequence,
                generation: Generation {
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    finish: FinishReason::Length,
                    stop_token: None,
                },
                logits,
            })
            .collect();
        // Rows share slots but not positions, so each row is checked against the context on
        // its own (above) and the cache is sized for the longest remaining run.
        let running = self.cache.take();
        let old: Vec<usize> = (0..self.running.len()).collect();
        let young: Vec<usize> = (0..new.len()).collect();
        let mut parts = vec![(&joining, young.as_slice())];
        if let Some(running) = &running {
            parts.insert(0, (running, old.as_slice()));
        }
        let needed = Self::capacity_for(&parts, self.running.iter().chain(&new));
        let cache = KvCache::gather(&parts, needed);
        drop(parts);
        let cache = match cache {
            Ok(c) => c,
            Err(e) => {
                self.cache = running;
                return Err(e);
            }
        };
        self.running.extend(new);
        self.cache = Some(cache);
        self.hooks = self.hooks_for(self.running.iter().map(|r| &r.sequence))?;
        Ok(())
    }

    /// Samples one token for every running sequence (shown to `on_token`, which may halt its
    /// sequence), retires the sequences that finished, and runs the others one step.
    /// Returns the finished sequences with their generations.
    pub fn step(
        &mut self,
        on_token: &mut dyn FnMut(&K, Sampled<'_>) -> Flow,
    ) -> Result<Vec<(K, Generation)>> {
        let mut next = Vec::with_capacity(self.running.len());
        let mut keep = Vec::with_capacity(self.running.len());
        for (row, r) in self.running.iter_mut().enumerate() {
            let finished = if r.answer_len() >= r.sequence.max_new_tokens {
                true
            } else {
                let forced = r.thinking.as_mut().and_then(Thinking::forced);
                let out = &mut r.generation;
                let (token, logprob) = match forced {
                    Some(token) => (token, log_softmax(&r.logits)[token as usize] as f32),
                    None => sample(&r.logits, &out.tokens, &r.sequence.sampling, &mut r.rng),
                };
                if let (Some(thinking), None) = (r.thinking.as_mut(), forced) {
                    thinking.record(token);
                }
                if forced.is_none()
                    && !r.sequence.ignore_eos
                    && self.model.tokenizer.is_end_of_generation(token)
                {
                    out.finish = FinishReason::Stop;
                    out.stop_token = Some(token);
                    true
                } else {
                    out.tokens.push(token);
                    out.logprobs.push(logprob);
                    let seen = Sampled {
                        row,
                        token,
                        logprob,
                        logits: &r.logits,
                    };
                    if on_token(&r.key, seen) == Flow::Halt {
                        out.finish = FinishReason::Halted;
                        true
                    } else {
                        r.answer_len() >= r.sequence.max_new_tokens
                    }
                }
            };
            if !finished {
                keep.push(row);
                next.push(*r.generation.tokens.last().expect("a token was just pushed"));
            }
        }
        let mut finished = Vec::new();
        if keep.len() < self.running.len() {
            let cache = self.cache.take().expect("running rows have a cache");
            let mut kept = Vec::with_capacity(keep.len());
            for (row, r) in std::mem::take(&mut self.running).into_iter().enumerate() {
                if keep.binary_search(&row).is_ok() {
                    kept.push(r);
                } else {
                    finished.push((r.key, r.generation));
                }
            }
            self.running = kept;
            if !self.running.is_empty() {
                let parts = [(&cache, keep.as_slice())];
                let needed = Self::capacity_for(&parts, self.running.iter());
                self.cache = Some(KvCache::gather(&parts, needed)?);
            }
            self.hooks = self.hooks_for(self.running.iter().map(|r| &r.sequence))?;
        }
        if let Some(cache) = self.cache.as_mut() {
            let chunk = cache.begin(vec![true; next.len()], 1, false)?;
            let logits = self
                .model
                .forward(&next, &chunk, cache, &mut self.hooks, Logits::Last)?;
            for (r, row) in self.running.iter_mut().zip(logits.to_vec2::<f32>()?) {
                r.logits = row;
            }
        }
        Ok(finished)
    }

    /// Runs `queue` to its end, shortest prompts first (rows of similar lengths waste less on
    /// padding), keeping up to `rows` sequences running: a finished sequence's row goes to the
    /// next waiting one at the next step. Each finished sequence is handed to `done` as soon
    /// as it finishes.
    pub fn run_queue<E: From<EngineError>>(
        &mut self,
        mut queue: Vec<(K, Sequence)>,
        rows: usize,
        padding: Padding,
        done: &mut dyn FnMut(K, Generation) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        queue.sort_by_key(|(_, s)| s.prompt.len());
        let mut queue = queue.into_iter().peekable();
        while queue.peek().is_some() || !self.is_empty() {
            let free = rows.max(1).saturating_sub(self.len());
            self.admit(queue.by_ref().take(free).collect(), padding)?;
            for (key, generation) in self.step(&mut |_, _| Flow::Continue)? {
                done(key, generation)?;
            }
        }
        Ok(())
    }

    /// The opening each of `sequences` copies (running the steered ones not kept yet), or
    /// `None` when there is no shared prefix to copy.
    fn openings<'a>(
        &mut self,
        sequences: impl Iterator<Item = &'a Sequence> + Clone,
        padding: Padding,
    ) -> Result<Option<Vec<&SharedPrefix>>> {
        let Some(prefix) = self.prefix.filter(|_| padding == Padding::Left) else {
            return Ok(None);
        };
        let reaching = |s: &'a Sequence| {
            s.steering
                .as_ref()
                .filter(|st| st.iter().any(|iv| iv.positions.reach_openings()))
        };
        for steering in sequences.clone().filter_map(reaching) {
            match self
                .steered_prefixes
                .iter()
                .position(|(kept, _)| Arc::ptr_eq(kept, steering))
            {
                Some(i) => {
                    let found = self.steered_prefixes.remove(i);
                    self.steered_prefixes.insert(0, found);
                }
                None => {
                    let opening = prefix.steered(self.model, steering)?;
                    self.steered_prefixes.insert(0, (steering.clone(), opening));
                    self.steered_prefixes.truncate(STEERED_PREFIXES);
                }
            }
        }
        Ok(Some(
            sequences
                .map(|s| match reaching(s) {
                    Some(steering) => self
                        .steered_prefixes
                        .iter()
                        .find(|(kept, _)| Arc::ptr_eq(kept, steering))
                        .map(|(_, opening)| opening)
                        .expect("run above"),
                    None => prefix,
                })
                .collect(),
        ))
    }

    /// Slots enough for the gathered rows plus every decode step their sequences may still run.
    fn capacity_for<'a>(
        parts: &[(&KvCache, &[usize])],
        sequences: impl Iterator<Item = &'a Running<K>>,
    ) -> usize
    where
        K: 'a,
    {
        let len = parts.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        let steps = sequences
            .map(|r| {
                r.sequence
                    .token_budget()
                    .saturating_sub(r.generation.tokens.len())
            })
            .max()
            .unwrap_or(0);
        len + steps
    }

    /// One set of hooks for these sequences as rows `0..`, each one's steering on its rows.
    fn hooks_for<'a>(&self, sequences: impl Iterator<Item = &'a Sequence>) -> Result<Hooks> {
        let mut groups: Vec<(&Interventions, Vec<usize>)> = Vec::new();
        for (row, s) in sequences.enumerate() {
            let Some(steering) = &s.steering else {
                continue;
            };
            match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, steering)) {
                Some((_, rows)) => rows.push(row),
                None => groups.push((steering, vec![row])),
            }
        }
        let mut hooks = self.model.new_hooks();
        for (steering, rows) in groups {
            for iv in steering.iter() {
                hooks.add(Intervention {
                    rows: Rows::Only(rows.clone()),
                    ..iv.clone()
                })?;
            }
        }
        Ok(hooks)
    }
}
