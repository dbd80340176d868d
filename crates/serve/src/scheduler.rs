//! The engine thread, the one place the model runs: continuous batching. Between decode steps
//! it admits what is queued while rows are free (a request takes one row per choice), asks the
//! gates of gated recipes about the newcomers, and adds them to the running batch, each row
//! with its own steering, sampling settings and budget; every token is streamed to its request
//! as it is sampled, and a row leaves the batch the step it finishes.
//!
//! Invariants: the model runs on this thread only (forward passes from several threads would
//! fight over the same cores); requests are admitted in arrival order; a request whose receiver
//! is gone (the client left) or whose text reached a stop string has its rows halted at the
//! next token; a request that cannot run fails alone, and the thread goes on serving.

use crate::api::Decoding;
use crate::metrics::Metrics;
use crate::stop::StopFilter;
use refusal_steer_engine::{
    log_softmax, Batcher, Flow, Generation, Interventions, Model, Padding, Sampled, Sampling,
    Sequence, SharedPrefix,
};
use refusal_steer_pipeline::answers::Format;
use refusal_steer_pipeline::Recipe;
use refusal_steer_tokenizer::StreamDecoder;
use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A recipe the server was started with, under the name requests choose it by.
pub struct Served {
    pub name: String,
    pub recipe: Recipe,
}

/// The steering a request asked for: a served recipe (by index) at a scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub recipe: usize,
    pub scale: f32,
}

/// One request, ready to run.
pub struct Job {
    pub prompt: Vec<u32>,
    /// What a gated recipe's gate judges: the last user message, or the completion prompt.
    pub gate_text: String,
    pub decoding: Decoding,
    pub max_tokens: usize,
    pub seed: u64,
    pub steering: Option<Choice>,
    /// `Some(k)`: report each token's log-probability and its `k` most likely alternatives.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
    pub queued: Instant,
}

/// What a request hears back, in order: `Steering` once, then tokens and one `Done` per
/// choice, or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    Steering(Option<Applied>),
    Token {
        choice: usize,
        /// New text (may be empty while a stop string or a UTF-8 character is incomplete).
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        choice: usize,
        finish: &'static str,
        completion_tokens: usize,
    },
    Failed(String),
}

/// The steering a request got.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub recipe: String,
    pub scale: f32,
    /// The recipe has a topic gate.
    pub gated: bool,
    /// The steering was applied (false when the gate held this request back).
    pub steered: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: Piece,
    pub logprob: f32,
    pub top: Vec<(Piece, f32)>,
}

/// A token's text and bytes (a piece may be part of a UTF-8 character).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub bytes: Vec<u8>,
}

/// Serves jobs until every sender is gone and the last sequence has finished.
pub fn run(
    model: Arc<Model>,
    served: Arc<Vec<Served>>,
    jobs: Receiver<Job>,
    max_rows: usize,
    metrics: Arc<Metrics>,
) {
    // Chat prompts all open with the template's system turn and user header: run it once.
    let prefix = Format::default().shared_prefix(&model).unwrap_or_else(|e| {
        eprintln!("note: the chat template's opening is computed per prompt ({e:#})");
        None
    });
    let mut engine = Engine {
        model: &model,
        served: &served,
        metrics: &metrics,
        opening: prefix.as_ref(),
        batcher: Batcher::new(&model).with_shared_prefix(prefix.as_ref()),
        active: HashMap::new(),
        rows: HashMap::new(),
        steering: HashMap::new(),
        next_id: 0,
    };
    // A job that did not fit the free rows waits here, ahead of the queue.
    let mut held: Option<Job> = None;
    loop {
        if engine.batcher.is_empty() && held.is_none() {
            match jobs.recv() {
                Ok(job) => held = Some(job),
                Err(_) => return,
            }
        }
        let mut joining = Vec::new();
        let mut rows = engine.batcher.len();
        while let Some(job) = held.take().or_else(|| jobs.try_recv().ok()) {
            if rows > 0 && rows + job.decoding.n > max_rows {
                held = Some(job);
                break;
            }
            rows += job.decoding.n;
            joining.push(job);
        }
        metrics.dequeued(joining.len());
        engine.admit(joining);
        engine.step();
    }
}

/// Steerings (recipe, scale) kept built at once.
const KEPT_STEERINGS: usize = 64;

/// A sequence's name in the batch: its request and which of the request's `n` choices.
type RowKey = (u64, usize);

/// A request whose sequences are running.
struct Active {
    job: Job,
    unfinished: usize,
    first_token_seen: bool,
}

/// What one running sequence has written so far.
struct Row {
    decoder: StreamDecoder,
    stop: StopFilter,
}

/// The running batch and what each of its rows answers to.
struct Engine<'a> {
    model: &'a Model,
    served: &'a [Served],
    metrics: &'a Metrics,
    /// The chat template's opening, run once (gates copy it too).
    opening: Option<&'a SharedPrefix>,
    batcher: Batcher<'a, RowKey>,
    active: HashMap<u64, Active>,
    rows: HashMap<RowKey, Row>,
    /// Each (recipe, scale) built once, so the rows that share it share hooks (and the
    /// batcher's steered opening); at most [`KEPT_STEERINGS`].
    steering: HashMap<(usize, u32), Interventions>,
    next_id: u64,
}

impl Engine<'_> {
    /// Gates `jobs`, tells each what steering it gets and adds its sequences to the batch;
    /// a job that cannot run fails alone.
    fn admit(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let gating = Instant::now();
        let steered = match gate(self.model, self.served, self.opening, &jobs) {
            Ok(s) => s,
            Err(e) => {
                for job in &jobs {
                    fail(job, &format!("the topic gate failed: {e:#}"), self.metrics);
                }
                return;
            }
        };
        let gated = gating.elapsed();
        let mut joining = Vec::new();
        let mut ids = Vec::new();
        for (job, steered) in jobs.into_iter().zip(steered) {
            let applied = job.steering.map(|c| Applied {
                recipe: self.served[c.recipe].name.clone(),
                scale: c.scale,
                gated: self.served[c.recipe].recipe.gate.is_some(),
                steered,
            });
            self.metrics.request(applied.as_ref());
            let _ = job.events.send(Event::Steering(applied));
            let steering = match job.steering.filter(|_| steered) {
                Some(choice) => match self.interventions(choice) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        fail(
                            &job,
                            &format!("the recipe cannot steer: {e:#}"),
                            self.metrics,
                        );
                        continue;
                    }
                },
                None => None,
            };
            let d = &job.decoding;
            let sequences: Vec<(RowKey, Sequence)> = (0..d.n)
                .map(|choice| {
                    let sequence = Sequence {
                        prompt: job.prompt.clone(),
                        seed: job.seed.wrapping_add(choice as u64),
                        sampling: Sampling {
                            temperature: d.temperature,
                            top_p: d.top_p,
                            top_k: 0,
                            repetition_penalty: d.repetition_penalty,
                        },
                        max_new_tokens: job.max_tokens,
                        steering: steering.clone(),
                        thinking: None,
                        ignore_eos: d.ignore_eos,
                    };
                    ((self.next_id, choice), sequence)
                })
                .collect();
            if let Err(e) = sequences
                .iter()
                .try_for_each(|(_, s)| self.batcher.check(s))
            {
                fail(&job, &format!("the request cannot run: {e}"), self.metrics);
                continue;
            }
            for (key, _) in &sequences {
                let stop = StopFilter::new(job.decoding.stop.clone());
                let decoder = StreamDecoder::default();
                self.rows.insert(*key, Row { decoder, stop });
            }
            let unfinished = sequences.len();
            let first_token_seen = false;
            self.active.insert(
                self.next_id,
                Active {
                    job,
                    unfinished,
                    first_token_seen,
                },
            );
            ids.push(self.next_id);
            self.next_id += 1;
            joining.extend(sequences);
        }
        let prefilling = Instant::now();
        if let Err(e) = self.batcher.admit(joining, Padding::Left) {
            for id in ids {
                self.drop_request(id, &format!("generation failed: {e}"));
            }
        }
        self.metrics.admitted(gated, prefilling.elapsed());
    }

    /// The steering of a served recipe at a scale, built once.
    fn interventions(&mut self, choice: Choice) -> anyhow::Result<Interventions> {
        let key = (choice.recipe, choice.scale.to_bits());
        if let Some(s) = self.steering.get(&key) {
            return Ok(s.clone());
        }
        let recipe = self.served[choice.recipe]
            .recipe
            .clone()
            .scaled(choice.scale);
        let interventions = recipe.interventions(self.model)?;
        if self.steering.len() == KEPT_STEERINGS {
            // Requests choose scales freely: forget them all rather than grow without end
            // (running rows keep their own copies).
            self.steering.clear();
        }
        self.steering.insert(key, interventions.clone());
        Ok(interventions)
    }

    /// One token for every running sequence, streamed to its request; finished sequences
    /// leave the batch.
    fn step(&mut self) {
        if self.batcher.is_empty() {
            return;
        }
        let (model, metrics) = (self.model, self.metrics);
        let (active, rows) = (&mut self.active, &mut self.rows);
        let started = Instant::now();
        let mut generated = 0;
        let finished = self.batcher.step(&mut |key, seen| {
            generated += 1;
            let (Some(request), Some(row)) = (active.get_mut(&key.0), rows.get_mut(key)) else {
                return Flow::Halt;
            };
            let job = &request.job;
            if job.events.is_closed() {
                return Flow::Halt;
            }
            if !request.first_token_seen {
                request.first_token_seen = true;
                metrics.first_token(job.queued.elapsed());
            }
            let bytes = model
                .tokenizer
                .token_bytes(seen.token, false)
                .unwrap_or_default();
            let (text, stopped) = row.stop.push(&row.decoder.push(&bytes));
            let logprob = job.logprobs.map(|k| token_logprob(model, &seen, &bytes, k));
            let _ = job.events.send(Event::Token {
                choice: key.1,
                text,
                logprob,
            });
            if stopped {
                Flow::Halt
            } else {
                Flow::Continue
            }
        });
        metrics.generated(generated, started.elapsed());
        match finished {
            Ok(finished) => {
                for (key, generation) in finished {
                    self.finish(key, &generation);
                }
            }
            Err(e) => {
                // A failed step leaves no row able to go on.
                self.batcher.clear();
                let ids: Vec<u64> = self.active.keys().copied().collect();
                for id in ids {
                    self.drop_request(id, &format!("generation failed: {e}"));
                }
            }
        }
    }

    /// Sends a finished sequence's last text and its end; the request ends with its last.
    fn finish(&mut self, key: RowKey, generation: &Generation) {
        let (Some(mut row), Some(request)) = (self.rows.remove(&key), self.active.get_mut(&key.0))
        else {
            return;
        };
        let rest = row.decoder.finish();
        let (mut text, _) = row.stop.push(&rest);
        text.push_str(&row.stop.finish());
        let events = &request.job.events;
        if !text.is_empty() {
            let logprob = None;
            let _ = events.send(Event::Token {
                choice: key.1,
                text,
                logprob,
            });
        }
        let _ = events.send(Event::Done {
            choice: key.1,
            finish: if row.stop.stopped() {
                "stop"
            } else {
                generation.finish.as_str()
            },
            completion_tokens: generation.tokens.len(),
        });
        request.unfinished -= 1;
        if request.unfinished == 0 {
            self.active.remove(&key.0);
        }
    }

    /// Fails request `id` and forgets its rows (which must already be out of the batch).
    fn drop_request(&mut self, id: u64, message: &str) {
        if let Some(request) = self.active.remove(&id) {
            fail(&request.job, message, self.metrics);
        }
        self.rows.retain(|(row_id, _), _| *row_id != id);
    }
}

fn fail(job: &Job, message: &str, metrics: &Metrics) {
    metrics.failed();
    let _ = job.events.send(Event::Failed(message.to_string()));
}

/// Per job, whether its steering applies: a gated recipe's gate must let its text through.
fn gate(
    model: &Model,
    served: &[Served],
    opening: Option<&SharedPrefix>,
    jobs: &[Job],
) -> anyhow::Result<Vec<bool>> {
    let mut steered = vec![true; jobs.len()];
    for (index, s) in served.iter().enumerate() {
        let asking: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].steering.is_some_and(|c| c.recipe == index))
            .collect();
        if asking.is_empty() || s.recipe.gate.is_none() {
            continue;
        }
        let texts: Vec<String> = asking.iter().map(|&i| jobs[i].gate_text.clone()).collect();
        let pass = s
            .recipe
            .steered(model, &Format::default(), opening, &texts, texts.len())?;
        for (&i, pass) in asking.iter().zip(pass) {
            steered[i] = pass;
        }
    }
    Ok(steered)
}

/// The sampled token's log-probability and the `k` most likely tokens at its step.
fn token_logprob(model: &Model, seen: &Sampled<'_>, bytes: &[u8], k: usize) -> TokenLogprob {
    let piece = |bytes: Vec<u8>| Piece {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    };
    let mut top = Vec::new();
    if k > 0 {
        let logprobs = log_softmax(seen.logits);
        let mut order: Vec<usize> = (0..logprobs.len()).collect();
        let k = k.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| logprobs[b].total_cmp(&logprobs[a]));
        order.truncate(k);
        order.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
        top = order
            .into_iter()
            .map(|t| {
                let bytes = model
                    .tokenizer
                    .token_bytes(t as u32, false)
                    .unwrap_or_default();
                (piece(bytes), logprobs[t] as f32)
            })
            .collect();
    }
    TokenLogprob {
        token: piece(bytes.to_vec()),
        logprob: seen.logprob,
        top,
    }
}
