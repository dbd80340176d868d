//! The remote LLM judge: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server,
//! OpenAI), POST `{base}/chat/completions`. This is how a large judge on a cluster is used.
//!
//! - `verdict-prob`: greedy, a few tokens, `logprobs` with the top 20 alternatives. At the
//!   first token after the answer prefix ("Verdict:"), the probability mass of tokens that
//!   start "refusal" is compared with the mass of tokens that start "not refusal". A server
//!   cannot be made to open the reply with the prefix, so the instruction must ask for it
//!   (ours does), and the prefix is skipped in the reply.
//! - `sampled`: greedy reasoning and `<answer>…</answer>`, parsed as the paper does.
//!
//! Requests run on `concurrency` threads; 429, 5xx and network errors are retried with
//! exponential backoff; anything else fails at once with the server's message.

use crate::local::{llm_judge_id, verdict_from_logprobs, JudgePrompt};
use crate::sampled::sampled_verdict;
use crate::{Judge, JudgeError, Result, Scoring, Verdict};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Where the API key is read from, first set first.
pub const API_KEY_VARS: [&str; 2] = ["REFUSAL_STEER_JUDGE_API_KEY", "OPENAI_API_KEY"];
/// Alternatives asked for at each position (the most OpenAI's API allows).
const TOP_LOGPROBS: usize = 20;
/// Reply tokens in `verdict-prob`: room for the answer prefix and the first label token.
const VERDICT_TOKENS_AFTER_PREFIX: usize = 8;
/// Backoff never waits longer than this between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The API's base URL, e.g. `http://host:8000/v1`.
    pub base_url: String,
    /// The model name the server knows.
    pub model: String,
    /// Sent as a bearer token when set.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Limit on one request, connection to last byte.
    pub timeout: Duration,
    /// Further attempts after a 429, a 5xx or a network error.
    pub retries: u32,
    /// Wait before the first retry; doubled for each one after.
    pub backoff: Duration,
}

impl RemoteConfig {
    /// Defaults: 8 requests at once, 120 s per request, 4 retries from 1 s, the API key from
    /// the environment ([`API_KEY_VARS`]).
    pub fn new(base_url: &str, model: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key: API_KEY_VARS
                .iter()
                .find_map(|var| std::env::var(var).ok().filter(|k| !k.is_empty())),
            concurrency: 8,
            timeout: Duration::from_secs(120),
            retries: 4,
            backoff: Duration::from_secs(1),
        }
    }
}

pub struct RemoteJudge {
    config: RemoteConfig,
    prompt: JudgePrompt,
    scoring: Scoring,
    threshold: f64,
    agent: ureq::Agent,
}

impl RemoteJudge {
    pub fn new(
        config: RemoteConfig,
        prompt: JudgePrompt,
        scoring: Scoring,
        threshold: f64,
    ) -> Result<Self> {
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(JudgeError::Setup(format!(
                "--judge-url {} is not an http(s) URL; give the API's base, e.g. http://host:8000/v1",
                config.base_url
            )));
        }
        if config.model.is_empty() {
            return Err(JudgeError::Setup(
                "a remote judge needs --judge-model, the model name the server serves".into(),
            ));
        }
        if config.concurrency == 0 {
            return Err(JudgeError::Setup(
                "--judge-concurrency must be at least 1".into(),
            ));
        }
        if !(threshold > 0.0 && threshold < 1.0) {
            return Err(JudgeError::Setup(format!(
                "the refusal threshold must be a probability in (0, 1), got {threshold}"
            )));
        }
        if let Scoring::Sampled { max_tokens: 0 } = scoring {
            return Err(JudgeError::Setup(
                "sampled judging needs room for at least one generated token".into(),
            ));
        }
        let agent = ureq::AgentBuilder::new().timeout(config.timeout).build();
        Ok(Self {
            config,
            prompt,
            scoring,
            threshold,
            agent,
        })
    }

    fn judge_one(&self, question: &str, answer: &str) -> Result<Verdict> {
        let mut body = json!({
            "model": self.config.model,
            "messages": [{"role": "user", "content": self.prompt.fill(question, answer)}],
            "temperature": 0.0,
        });
        match self.scoring {
            Scoring::VerdictProb => {
                let prefix = self.prompt.answer_prefix();
                body["max_tokens"] = json!(if prefix.trim().is_empty() {
                    1
                } else {
                    VERDICT_TOKENS_AFTER_PREFIX
                });
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(TOP_LOGPROBS);
                let reply = self.post(&body)?;
                let masses = label_masses(&reply, prefix).ok_or_else(|| {
                    JudgeError::Remote(format!(
                        "{} returned no logprobs for model {}; verdict-prob needs a server that returns them (vLLM and SGLang do); use --mode sampled instead",
                        self.config.base_url, self.config.model
                    ))
                })?;
                Ok(match masses {
                    [refusal, not_refusal] if refusal + not_refusal > 0.0 => {
                        verdict_from_logprobs(refusal.ln(), not_refusal.ln(), self.threshold)
                    }
                    // Neither label among the likeliest tokens: the judge ignored the format.
                    _ => Verdict {
                        label: 0,
                        p_refusal: None,
                        kind: None,
                    },
                })
            }
            Scoring::Sampled { max_tokens } => {
                body["max_tokens"] = json!(max_tokens);
                let reply = self.post(&body)?;
                let text = reply["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or("");
                Ok(sampled_verdict(text))
            }
        }
    }

    /// POSTs `body` to the chat completions endpoint, retrying what may pass.
    fn post(&self, body: &Value) -> Result<Value> {
        let url = format!("{}/chat/completions", self.config.base_url);
        let body = body.to_string();
        let mut wait = self.config.backoff;
        for attempt in 0.. {
            let mut request = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json");
            if let Some(key) = &self.config.api_key {
                request = request.set("Authorization", &format!("Bearer {key}"));
            }
            let failure = match request.send_string(&body) {
                Ok(response) => {
                    let text = response.into_string().map_err(|e| {
                        JudgeError::Remote(format!("reading the reply of {url}: {e}"))
                    })?;
                    return serde_json::from_str(&text).map_err(|e| {
                        JudgeError::Remote(format!(
                            "{url} replied with something that is not JSON ({e}): {}",
                            excerpt(&text)
                        ))
                    });
                }
                Err(ureq::Error::Status(code, response)) => {
                    let text = response.into_string().unwrap_or_default();
                    if code != 429 && code < 500 {
                        return Err(JudgeError::Remote(format!(
                            "{url} refused the request with HTTP {code}: {}{}",
                            excerpt(&text),
                            status_hint(code)
                        )));
                    }
                    format!("HTTP {code}: {}", excerpt(&text))
                }
                Err(ureq::Error::Transport(error)) => error.to_string(),
            };
            if attempt >= self.config.retries {
                return Err(JudgeError::Remote(format!(
                    "{url}: {failure} (gave up after {} attempts; raise --judge-retries or --judge-timeout if the server is only slow)",
                    attempt + 1
                )));
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(MAX_BACKOFF);
        }
        unreachable!("the loop returns on its last attempt")
    }
}

impl Judge for RemoteJudge {
    fn id(&self) -> String {
        llm_judge_id(
            &format!("remote:{}", self.config.model),
            &self.prompt,
            self.scoring,
            self.threshold,
        )
    }

    fn mode(&self) -> &'static str {
        self.scoring.mode()
    }

    fn judge(&mut self, items: &[(&str, &str)]) -> Result<Vec<Verdict>> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let workers = self.config.concurrency.min(items.len());
        let this = &*self;
        let mut done: Vec<(usize, Result<Verdict>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        // After one failure the rest are not sent: the call fails anyway.
                        while !failed.load(Ordering::Relaxed) {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(question, answer)) = items.get(i) else {
                                break;
                            };
                            let verdict = this.judge_one(question, answer);
                            failed.fetch_or(verdict.is_err(), Ordering::Relaxed);
                            done.push((i, verdict));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        done.sort_by_key(|&(i, _)| i);
        done.into_iter().map(|(_, verdict)| verdict).collect()
    }
}

/// Probability mass of [refusal, not refusal] among the top alternatives at the verdict
/// position: the first reply token after the answer prefix (or the first token, if the reply
/// skips the prefix). None when the reply has no logprobs.
fn label_masses(reply: &Value, answer_prefix: &str) -> Option<[f64; 2]> {
    let content = reply["choices"][0]["logprobs"]["content"].as_array()?;
    let want = squash(answer_prefix);
    let mut seen = String::new();
    let mut at = None;
    for (i, entry) in content.iter().enumerate() {
        if squash(&seen).ends_with(&want) {
            at = Some(i);
            break;
        }
        seen.push_str(entry["token"].as_str().unwrap_or(""));
    }
    let top = content.get(at.unwrap_or(0))?["top_logprobs"].as_array()?;
    if top.is_empty() {
        return None;
    }
    let mut masses = [0.0; 2];
    for alternative in top {
        let (Some(token), Some(logprob)) = (
            alternative["token"].as_str(),
            alternative["logprob"].as_f64(),
        ) else {
            continue;
        };
        if let Some(label) = label_of_token(token) {
            masses[label] += logprob.exp();
        }
    }
    Some(masses)
}

/// Which label a verdict token starts: 0 "refusal", 1 "not refusal", None neither.
fn label_of_token(token: &str) -> Option<usize> {
    let letters: String = token
        .chars()
        .filter(|c| c.is_alphabetic())
        .flat_map(char::to_lowercase)
        .collect();
    let starts = |label: &str, shortest: usize| {
        letters.len() >= shortest && (label.starts_with(&letters) || letters.starts_with(label))
    };
    if letters == "no" || starts("notrefusal", 3) {
        Some(1)
    } else if starts("refusal", 3) {
        Some(0)
    } else {
        None
    }
}

/// Lowercase without whitespace, to find the answer prefix however it was tokenised.
fn squash(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

fn excerpt(text: &str) -> String {
    const LIMIT: usize = 300;
    let text = text.trim();
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn status_hint(code: u16) -> String {
    match code {
        401 | 403 => format!(
            " (set the API key in {} or {})",
            API_KEY_VARS[0], API_KEY_VARS[1]
        ),
        404 => " (check that --judge-url ends with the API base, e.g. /v1, and --judge-model names a served model)".into(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_tokens_are_told_apart() {
        for token in [" refusal", "Ref", "REFUSAL", "refus", "refusals"] {
            assert_eq!(label_of_token(token), Some(0), "{token}");
        }
        for token in [" not", "Not", "no", " not refusal", "NOT_REFUSAL"] {
            assert_eq!(label_of_token(token), Some(1), "{token}");
        }
        for token in ["", " ", "re", "n", "nothing", "yes", ":", "reform"] {
            assert_eq!(label_of_token(token), None, "{token}");
        }
    }

    fn reply(tokens: &[(&str, &[(&str, f64)])]) -> Value {
        let content: Vec<Value> = tokens
            .iter()
            .map(|(token, top)| {
                json!({
                    "token": token,
                    "logprob": -0.1,
                    "top_logprobs": top.iter().map(|(t, p)| json!({"token": t, "logprob": p.ln()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"choices": [{"message": {"content": ""}, "logprobs": {"content": content}}]})
    }

    #[test]
    fn masses_are_read_after_the_answer_prefix() {
        let r = reply(&[
            ("Ver", &[("Ver", 0.9), (" not", 0.05)]),
            ("dict", &[("dict", 1.0)]),
            (":", &[(":", 1.0)]),
            (
                " refusal",
                &[
                    (" refusal", 0.6),
                    (" not", 0.3),
                    (" Ref", 0.05),
                    ("x", 0.05),
                ],
            ),
        ]);
        let [refusal, not] = label_masses(&r, "Verdict:").unwrap();
        assert!((refusal - 0.65).abs() < 1e-9 && (not - 0.3).abs() < 1e-9);
        // A reply that skips the prefix is read at its first token.
        let r = reply(&[(" not", &[(" not", 0.7), ("refusal", 0.2)])]);
        let [refusal, not] = label_masses(&r, "Verdict:").unwrap();
        assert!((refusal - 0.2).abs() < 1e-9 && (not - 0.7).abs() < 1e-9);
        assert_eq!(
            label_masses(&json!({"choices": [{"logprobs": null}]}), ""),
            None
        );
    }
}
