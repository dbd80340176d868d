//! The engine thread, the one place the model runs. Requests queue here; each round takes
//! what is waiting (up to `max_rows` rows), asks the gates of gated recipes about their
//! requests, groups the rows that can share a batch (same steering, same decoding settings)
//! and generates each group as one batch, streaming every token to its request as it is
//! sampled.
//!
//! Invariants: the model runs on this thread only (forward passes from several threads would
//! fight over the same cores); a request whose receiver is gone (the client left) or whose
//! text reached a stop string has its rows halted at the next token; a failing group fails
//! only its own requests, and the thread goes on serving.

use crate::api::Decoding;
use crate::metrics::Metrics;
use crate::stop::StopFilter;
use refusal_steer_engine::{
    generate, log_softmax, Flow, GenerateOptions, Model, Padding, Request, Sampled, Sampling,
};
use refusal_steer_pipeline::answers::Format;
use refusal_steer_pipeline::Recipe;
use refusal_steer_tokenizer::StreamDecoder;
use std::collections::BTreeMap;
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

/// Rows share a batch when everything `generate` takes per batch is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    steering: Option<(usize, u32)>,
    temperature: u32,
    top_p: u32,
    repetition_penalty: u32,
    max_tokens: usize,
}

/// Serves jobs until every sender is gone.
pub fn run(
    model: Arc<Model>,
    served: Arc<Vec<Served>>,
    jobs: Receiver<Job>,
    max_rows: usize,
    metrics: Arc<Metrics>,
) {
    while let Ok(first) = jobs.recv() {
        let mut round = vec![first];
        let mut rows = round[0].decoding.n;
        while rows < max_rows {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.decoding.n;
                    round.push(job);
                }
                Err(_) => break,
            }
        }
        metrics.dequeued(round.len());
        run_round(&model, &served, round, &metrics);
    }
}

fn run_round(model: &Model, served: &[Served], round: Vec<Job>, metrics: &Metrics) {
    let steered = match gate(model, served, &round) {
        Ok(s) => s,
        Err(e) => {
            for job in &round {
                fail(job, &format!("the topic gate failed: {e:#}"), metrics);
            }
            return;
        }
    };
    let mut groups: BTreeMap<GroupKey, Vec<usize>> = BTreeMap::new();
    for (i, job) in round.iter().enumerate() {
        let applied = job.steering.map(|c| Applied {
            recipe: served[c.recipe].name.clone(),
            scale: c.scale,
            gated: served[c.recipe].recipe.gate.is_some(),
            steered: steered[i],
        });
        metrics.request(applied.as_ref());
        let _ = job.events.send(Event::Steering(applied));
        let d = &job.decoding;
        let key = GroupKey {
            steering: job
                .steering
                .filter(|_| steered[i])
                .map(|c| (c.recipe, c.scale.to_bits())),
            temperature: d.temperature.to_bits(),
            top_p: d.top_p.to_bits(),
            repetition_penalty: d.repetition_penalty.to_bits(),
            max_tokens: job.max_tokens,
        };
        groups.entry(key).or_default().push(i);
    }
    for (key, members) in groups {
        let jobs: Vec<&Job> = members.iter().map(|&i| &round[i]).collect();
        if let Err(e) = run_group(model, served, key, &jobs, metrics) {
            for job in jobs {
                fail(job, &format!("generation failed: {e:#}"), metrics);
            }
        }
    }
}

fn fail(job: &Job, message: &str, metrics: &Metrics) {
    metrics.failed();
    let _ = job.events.send(Event::Failed(message.to_string()));
}

/// Per job, whether its steering applies: a gated recipe's gate must let its text through.
fn gate(model: &Model, served: &[Served], round: &[Job]) -> anyhow::Result<Vec<bool>> {
    let mut steered = vec![true; round.len()];
    for (index, s) in served.iter().enumerate() {
        let asking: Vec<usize> = (0..round.len())
            .filter(|&i| round[i].steering.is_some_and(|c| c.recipe == index))
            .collect();
        if asking.is_empty() || s.recipe.gate.is_none() {
            continue;
        }
        let texts: Vec<String> = asking.iter().map(|&i| round[i].gate_text.clone()).collect();
        let pass = s
            .recipe
            .steered(model, &Format::default(), &texts, texts.len())?;
        for (&i, pass) in asking.iter().zip(pass) {
            steered[i] = pass;
        }
    }
    Ok(steered)
}

/// What one row of a batch has written so far.
struct Row<'a> {
    job: &'a Job,
    /// The job's index in the group.
    index: usize,
    choice: usize,
    decoder: StreamDecoder,
    stop: StopFilter,
}

fn run_group(
    model: &Model,
    served: &[Served],
    key: GroupKey,
    jobs: &[&Job],
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let mut hooks = match key.steering {
        Some((recipe, scale)) => served[recipe]
            .recipe
            .clone()
            .scaled(f32::from_bits(scale))
            .hooks(model)?,
        None => model.new_hooks(),
    };
    let first = &jobs[0].decoding;
    let options = GenerateOptions {
        max_new_tokens: key.max_tokens,
        sampling: Sampling {
            temperature: first.temperature,
            top_p: first.top_p,
            top_k: 0,
            repetition_penalty: first.repetition_penalty,
        },
        padding: Padding::Left,
    };
    let mut rows = Vec::new();
    let mut requests = Vec::new();
    for (index, job) in jobs.iter().enumerate() {
        for choice in 0..job.decoding.n {
            rows.push(Row {
                job,
                index,
                choice,
                decoder: StreamDecoder::default(),
                stop: StopFilter::new(job.decoding.stop.clone()),
            });
            requests.push(Request {
                prompt: job.prompt.clone(),
                seed: job.seed.wrapping_add(choice as u64),
            });
        }
    }
    let started = Instant::now();
    let mut first_token_seen = vec![false; jobs.len()];
    let generations = generate(model, &requests, &options, &mut hooks, &mut |seen| {
        let row = &mut rows[seen.row];
        if row.job.events.is_closed() {
            return Flow::Halt;
        }
        if !first_token_seen[row.index] {
            first_token_seen[row.index] = true;
            metrics.first_token(row.job.queued.elapsed());
        }
        let bytes = model
            .tokenizer
            .token_bytes(seen.token, false)
            .unwrap_or_default();
        let (text, stopped) = row.stop.push(&row.decoder.push(&bytes));
        let logprob = row
            .job
            .logprobs
            .map(|k| token_logprob(model, &seen, &bytes, k));
        let _ = row.job.events.send(Event::Token {
            choice: row.choice,
            text,
            logprob,
        });
        if stopped {
            Flow::Halt
        } else {
            Flow::Continue
        }
    })?;
    let mut generated = 0;
    for (row, generation) in rows.iter_mut().zip(&generations) {
        generated += generation.tokens.len();
        let rest = row.decoder.finish();
        let (mut text, _) = row.stop.push(&rest);
        text.push_str(&row.stop.finish());
        if !text.is_empty() {
            let _ = row.job.events.send(Event::Token {
                choice: row.choice,
                text,
                logprob: None,
            });
        }
        let _ = row.job.events.send(Event::Done {
            choice: row.choice,
            finish: if row.stop.stopped() {
                "stop"
            } else {
                generation.finish.as_str()
            },
            completion_tokens: generation.tokens.len(),
        });
    }
    metrics.generated(generated, started.elapsed());
    Ok(())
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
