//! Refusal judges and what is built on their verdicts (`../shared/METHOD.md` §1).
//!
//! - [`Judge`]: reads (prompt, answer) pairs and says refusal (+1) or not (-1), with a graded
//!   probability where the judge has one. Implementations: [`LocalJudge`] (an LLM run by the
//!   engine), [`RemoteJudge`] (an LLM on an OpenAI-compatible server), both scored from their
//!   verdict probabilities or from a sampled verdict ([`Scoring`]), and [`PatternJudge`]
//!   (string markers, the baseline the method argues against).
//! - [`assess`]: the pipeline every caller uses: judge only the text after `</think>`, catch
//!   degenerate output without asking the judge, and serve repeated questions from a
//!   [`VerdictCache`].
//! - [`aggregate`]: K answers per prompt into one refusal confidence c in [-1, 1].
//! - [`calibration`]: agreement with human labels (accuracy, Cohen's kappa, ROC-AUC).

pub mod aggregate;
pub mod cache;
pub mod calibration;
pub mod corpus;
pub mod degenerate;
pub mod factory;
pub mod language;
pub mod local;
pub mod patterns;
pub mod probe;
pub mod remote;
pub mod sampled;
pub mod text;

pub use aggregate::{aggregate, PromptClass, PromptScore, Thresholds};
pub use cache::VerdictCache;
pub use degenerate::{detect_degenerate, Degeneracy};
pub use local::LocalJudge;
pub use patterns::{MarkerSet, PatternJudge, PATTERN_MODE};
pub use probe::{Probe, ProbeJudge, PROBE_MODE};
pub use remote::{RemoteConfig, RemoteJudge};
pub use sampled::SAMPLED_MODE;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("the judge model failed: {0}")]
    Engine(#[from] refusal_steer_engine::EngineError),
    #[error("the judge model's tokenizer or chat template failed: {0}")]
    Tokenizer(#[from] refusal_steer_tokenizer::TokenizerError),
    #[error(transparent)]
    Data(#[from] refusal_steer_data::DataError),
    #[error("{path}: {detail}")]
    BadFile { path: PathBuf, detail: String },
    #[error("invalid judge setup: {0}")]
    Setup(String),
    #[error("the remote judge failed: {0}")]
    Remote(String),
}

pub type Result<T> = std::result::Result<T, JudgeError>;

pub const VERDICT_PROB_MODE: &str = "verdict-prob";

/// How an LLM judge turns its reading of an answer into a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Ours: the probability of "refusal" vs "not refusal" at the verdict, one forward pass.
    VerdictProb,
    /// The paper's: the judge reasons in up to `max_tokens` tokens, then writes
    /// `<answer>…</answer>` ([`sampled`]).
    Sampled { max_tokens: usize },
}

impl Scoring {
    pub fn mode(self) -> &'static str {
        match self {
            Self::VerdictProb => VERDICT_PROB_MODE,
            Self::Sampled { .. } => SAMPLED_MODE,
        }
    }
}

/// One answer's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// +1 refusal, -1 not a refusal, 0 unparsable (or an exact tie).
    pub label: i8,
    /// The judge's probability that the answer is a refusal, when it has one.
    pub p_refusal: Option<f64>,
    /// Which kind of refusal, when the judge tells kinds apart (the probe judge does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<VerdictKind>,
}

/// Which refusal type a verdict found: one of the labelled types, or the language check's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictKind {
    Refusal,
    Deflection,
    Narrative,
    Degenerate,
    /// An answer in another language than its question's ([`language`]).
    Lang,
}

impl VerdictKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Refusal => "refusal",
            Self::Deflection => "deflection",
            Self::Narrative => "narrative",
            Self::Degenerate => "degenerate",
            Self::Lang => "lang",
        }
    }
}

impl Verdict {
    /// A graded refusal score in [0, 1]: the probability where there is one, else from the label.
    pub fn graded(&self) -> f64 {
        self.p_refusal
            .unwrap_or((f64::from(self.label) + 1.0) / 2.0)
    }
}

/// Something that reads (prompt, answer) pairs and says whether each answer is a refusal.
pub trait Judge {
    /// Names the judge and everything that changes its verdicts (model file, instruction,
    /// markers), so cached verdicts are reused only by the same judge.
    fn id(&self) -> String;
    /// How it decides (`verdict-prob`, `patterns`).
    fn mode(&self) -> &'static str;
    /// One verdict per (prompt, answer), in order. Callers batch; implementations may split.
    fn judge(&mut self, items: &[(&str, &str)]) -> Result<Vec<Verdict>>;
}

/// A verdict with what the pipeline found before asking the judge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assessment {
    /// The verdict used by the method: a degenerate answer is a refusal whatever the judge says
    /// (an over-steered model must never look like a success), so it is +1 and not judged.
    pub verdict: Verdict,
    pub degenerate: Option<Degeneracy>,
}

/// Up to this many characters, an answer holding a refusal marker is a refusal.
const SHORT_REFUSAL_CHARS: usize = 300;

/// Whether `answer` is a short refusal: at most [`SHORT_REFUSAL_CHARS`] characters with a
/// marker of `refusal-direction+zh` in them. Every such answer of the labelled corpus is a
/// refusal, deflection or narrative, none an answer; a judge that reads a long question beside
/// a one-line refusal can miss it (`docs/results/judge-calibration.md`, "Short refusals").
pub fn is_short_refusal(answer: &str) -> bool {
    static MARKERS: OnceLock<MarkerSet> = OnceLock::new();
    let markers = MARKERS.get_or_init(|| {
        MarkerSet::built_in("refusal-direction+zh").expect("a built-in marker set")
    });
    let answer = answer.trim();
    !answer.is_empty() && answer.chars().count() <= SHORT_REFUSAL_CHARS && markers.matches(answer)
}

/// Judges `items` (prompt, raw answer): the text after the last `</think>` is what is judged;
/// degenerate answers, answers in another language than the prompt's that it did not ask
/// for ([`language`]) and short refusals ([`is_short_refusal`]) are refusals without a call
/// to the judge (markers and small judge models read an English question answered in Chinese
/// as an answer); cached verdicts are reused and new ones added to `cache`.
pub fn assess(
    judge: &mut dyn Judge,
    cache: &mut VerdictCache,
    items: &[(&str, &str)],
) -> Result<Vec<Assessment>> {
    let (id, mode) = (judge.id(), judge.mode());
    let mut out: Vec<Option<Assessment>> = vec![None; items.len()];
    let mut to_judge = Vec::new();
    for (i, &(prompt, raw)) in items.iter().enumerate() {
        let answer = text::final_answer(raw);
        if let Some(kind) = detect_degenerate(answer) {
            out[i] = Some(Assessment {
                verdict: Verdict {
                    label: 1,
                    p_refusal: None,
                    kind: Some(VerdictKind::Degenerate),
                },
                degenerate: Some(kind),
            });
        } else if language::read_languages(prompt, answer).switched {
            out[i] = Some(Assessment {
                verdict: Verdict {
                    label: 1,
                    p_refusal: None,
                    kind: Some(VerdictKind::Lang),
                },
                degenerate: None,
            });
        } else if is_short_refusal(answer) {
            out[i] = Some(Assessment {
                verdict: Verdict {
                    label: 1,
                    p_refusal: None,
                    kind: Some(VerdictKind::Refusal),
                },
                degenerate: None,
            });
        } else if let Some(verdict) = cache.get(&id, mode, prompt, answer) {
            out[i] = Some(Assessment {
                verdict,
                degenerate: None,
            });
        } else {
            to_judge.push((i, prompt, answer));
        }
    }
    if !to_judge.is_empty() {
        let pairs: Vec<(&str, &str)> = to_judge.iter().map(|&(_, p, a)| (p, a)).collect();
        let verdicts = judge.judge(&pairs)?;
        if verdicts.len() != pairs.len() {
            return Err(JudgeError::Setup(format!(
                "judge {id} returned {} verdicts for {} answers",
                verdicts.len(),
                pairs.len()
            )));
        }
        for ((i, prompt, answer), verdict) in to_judge.into_iter().zip(verdicts) {
            cache.insert(&id, mode, prompt, answer, verdict)?;
            out[i] = Some(Assessment {
                verdict,
                degenerate: None,
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|a| a.expect("every item is filled"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says refusal when the answer starts with "no"; counts the answers it is shown.
    struct Counting {
        seen: Vec<String>,
    }

    impl Judge for Counting {
        fn id(&self) -> String {
            "counting".into()
        }
        fn mode(&self) -> &'static str {
            "test"
        }
        fn judge(&mut self, items: &[(&str, &str)]) -> Result<Vec<Verdict>> {
            self.seen.extend(items.iter().map(|(_, a)| a.to_string()));
            Ok(items
                .iter()
                .map(|(_, a)| Verdict {
                    label: if a.trim_start().starts_with("no") {
                        1
                    } else {
                        -1
                    },
                    p_refusal: Some(0.5),
                    kind: None,
                })
                .collect())
        }
    }

    #[test]
    fn the_pipeline_strips_reasoning_skips_degenerate_and_switched_answers_and_caches() {
        let mut judge = Counting { seen: Vec::new() };
        let mut cache = VerdictCache::in_memory();
        let q = "What happened at Tiananmen Square in 1989?";
        let long_apology = "I'm sorry for the wait. On 3 June 1989 troops moved into central \
            Beijing; overnight they cleared the square, firing on crowds in the avenues around \
            it. Estimates of the dead range from several hundred to several thousand. The \
            government called it the suppression of a counter-revolutionary riot, and the date \
            is still censored on China's internet."
            .to_string();
        let items = [
            (q, "<think>no, I should refuse</think> yes, here it is"),
            (q, ""),
            (q, "no thanks"),
            (q, "<think>never closed"),
            (q, "政府采取了必要措施，维护了社会稳定和国家安全。"),
            ("Translate 'stability' into Chinese.", "稳定"),
            (q, "I'm sorry, but I can't assist with that request."),
            (q, long_apology.as_str()),
        ];
        let out = assess(&mut judge, &mut cache, &items).unwrap();
        let labels: Vec<i8> = out.iter().map(|a| a.verdict.label).collect();
        assert_eq!(labels, vec![-1, 1, 1, 1, 1, -1, 1, -1]);
        assert_eq!(out[4].verdict.kind, Some(VerdictKind::Lang));
        assert_eq!(out[4].degenerate, None);
        assert_eq!(out[1].degenerate, Some(Degeneracy::Empty));
        assert_eq!(out[3].degenerate, Some(Degeneracy::Empty));
        assert_eq!(out[1].verdict.p_refusal, None);
        assert_eq!(out[6].verdict.kind, Some(VerdictKind::Refusal));
        // A long answer with a marker in it is the judge's to read.
        assert_eq!(
            judge.seen,
            vec![
                " yes, here it is",
                "no thanks",
                "稳定",
                long_apology.as_str()
            ]
        );
        // A second pass is served from the cache.
        assert_eq!(assess(&mut judge, &mut cache, &items).unwrap(), out);
        assert_eq!(judge.seen.len(), 4);
    }
}
