//! Measuring one condition (unsteered, or one steering setting) on prompt sets: refusal rates
//! by the run's judge and by the marker list, degenerate answers, next-token KL to the unsteered model,
//! and multiple-choice accuracy by answer likelihood.

use crate::answers::Format;
use crate::capture::by_length;
use crate::config::Direction;
use crate::generator::Generator;
use crate::recipe::{hooks_for, Recipe};
use crate::sets::Choice;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{prefill, GenerateOptions, Logits, Model, Padding};
use refusal_steer_judge::{assess, Assessment, Judge, VerdictCache, VerdictKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Refusals in one set under one condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetRate {
    pub n: usize,
    /// By the run's judge (degenerate and switched-language answers count as refusals).
    pub refusals: usize,
    pub rate: f64,
    /// Wilson 95% interval of `rate`.
    pub ci: (f64, f64),
    /// By the marker list, for comparison.
    pub pattern_refusals: usize,
    /// Loops and word salad: found by the degeneracy check or typed so by the judge.
    pub degenerate: usize,
    /// Refusals the judge typed as deflection, narrative or a switched language.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kinds: BTreeMap<VerdictKind, usize>,
    /// The run judge's graded p(refusal) per answer (its label for a marker list; 1 for
    /// degenerate answers).
    #[serde(default)]
    pub scores: Vec<f64>,
    /// Answers a topic gate let in (and so were steered), where the condition is gated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gated_in: Option<usize>,
}

impl SetRate {
    /// The same rates, with how many of `answers` a topic gate let in, where their records
    /// say (`steering.gated_in`).
    pub fn with_gate(self, answers: &[Answer]) -> Self {
        let said: Vec<bool> = answers
            .iter()
            .filter_map(|a| a.steering.as_ref()?.get("gated_in")?.as_bool())
            .collect();
        Self {
            gated_in: (!said.is_empty()).then(|| said.iter().filter(|&&g| g).count()),
            ..self
        }
    }

    /// The share of answers that miss the aim of steering in `direction`: refusals when
    /// removing them; answers that are not real refusals when inducing them. A degenerate
    /// answer (a loop) is never a success: removing refusals, it already counts as one;
    /// inducing them, counting it as one would reward breaking the model (the first induce run
    /// with the RMD gate "refused" 20 of 20 test target prompts, every one of them a loop).
    pub fn missed(&self, direction: Direction) -> f64 {
        match direction {
            Direction::Remove => self.rate,
            Direction::Induce => {
                let real = self.refusals.saturating_sub(self.degenerate);
                1.0 - real as f64 / self.n.max(1) as f64
            }
        }
    }

    /// "2 degenerate, 3 narrative": the refusals of a type other than a plain refusal, or "".
    pub fn types(&self) -> String {
        let degenerate = (self.degenerate > 0).then(|| format!("{} degenerate", self.degenerate));
        let typed = self.kinds.iter().map(|(k, n)| format!("{n} {}", k.name()));
        degenerate
            .into_iter()
            .chain(typed)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The refusal types, and under a gate how many answers it let in: "2 degenerate;
    /// gate let in 8/10" (empty when there is neither).
    pub fn notes(&self) -> String {
        let gate = self.gated_in.map(|k| format!("gate let in {k}/{}", self.n));
        Some(self.types())
            .filter(|t| !t.is_empty())
            .into_iter()
            .chain(gate)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// "83%", or "83% (2 degenerate, 3 narrative; gate let in 8/10)" when some refusals are
    /// of another type or a gate chose the answers steered.
    pub fn percent(&self) -> String {
        match self.notes() {
            t if t.is_empty() => format!("{:.0}%", 100.0 * self.rate),
            t => format!("{:.0}% ({t})", 100.0 * self.rate),
        }
    }
}

/// Wilson score interval (95%) of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.959_963_984_540_054);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The two judges every answer is read by: the run's judge (`llm`, usually an LLM) and the
/// marker list beside it.
pub struct Judges<'a> {
    pub llm: &'a mut dyn Judge,
    pub llm_cache: &'a mut VerdictCache,
    pub patterns: &'a mut dyn Judge,
    pub pattern_cache: &'a mut VerdictCache,
}

/// One answer as the run's judge and the marker list assessed it.
pub type Assessed = (Assessment, Assessment);

impl Judges<'_> {
    /// (the run judge's assessment, the marker list's) per answer.
    pub fn assess(&mut self, answers: &[Answer]) -> Result<Vec<Assessed>> {
        let items: Vec<(&str, &str)> = answers
            .iter()
            .map(|a| (a.prompt.as_str(), a.answer.as_str()))
            .collect();
        let mut llm = Vec::with_capacity(items.len());
        // Small chunks so a killed run keeps what was judged (the cache is on disk).
        for chunk in items.chunks(8) {
            llm.extend(assess(self.llm, self.llm_cache, chunk)?);
        }
        let patterns = assess(self.patterns, self.pattern_cache, &items)?;
        Ok(llm.into_iter().zip(patterns).collect())
    }
}

/// Rates from the first answer of each prompt.
pub fn rate(assessed: &[Assessed]) -> SetRate {
    let n = assessed.len();
    let refusals = assessed.iter().filter(|(a, _)| a.verdict.label > 0).count();
    SetRate {
        n,
        refusals,
        rate: refusals as f64 / n.max(1) as f64,
        ci: wilson(refusals, n),
        pattern_refusals: assessed.iter().filter(|(_, p)| p.verdict.label > 0).count(),
        // `assess` types every answer the degeneracy check found as degenerate.
        degenerate: assessed
            .iter()
            .filter(|(a, _)| a.verdict.kind == Some(VerdictKind::Degenerate))
            .count(),
        kinds: assessed
            .iter()
            .filter_map(|(a, _)| a.verdict.kind)
            .filter(|k| !matches!(k, VerdictKind::Refusal | VerdictKind::Degenerate))
            .fold(BTreeMap::new(), |mut counts, k| {
                *counts.entry(k).or_insert(0) += 1;
                counts
            }),
        scores: assessed.iter().map(|(a, _)| a.verdict.graded()).collect(),
        gated_in: None,
    }
}

/// Which of `texts` `recipe` steers (none when there is no recipe).
fn selection(
    recipe: Option<&Recipe>,
    model: &Model,
    format: &Format,
    texts: &[String],
    batch: usize,
) -> Result<Vec<bool>> {
    match recipe {
        None => Ok(vec![false; texts.len()]),
        Some(r) => r.steered(
            model,
            format,
            format.shared_prefix(model)?.as_ref(),
            texts,
            batch,
        ),
    }
}

/// Greedy answers to each group's prompts in its file (resumable), in prompt order, the
/// groups sharing the batch; the prompts a gated `recipe` keeps out are answered from
/// `unsteered` where it holds them.
#[allow(clippy::too_many_arguments)]
pub fn answers_for(
    model: &Model,
    groups: &[(&[Prompt], &Path)],
    format: &Format,
    options: &GenerateOptions,
    batch: usize,
    seed: u64,
    recipe: Option<&Recipe>,
    unsteered: Option<&[Answer]>,
    progress: &ProgressBar,
) -> Result<Vec<Vec<Answer>>> {
    let generator = Generator {
        model,
        recipe,
        format: format.clone(),
        options: options.clone(),
        batch,
        seed,
        description: None,
        unsteered,
    };
    let files = generator.answer_to_files(groups, 1, progress)?;
    groups
        .iter()
        .zip(files)
        .map(|((prompts, path), all)| {
            let by_id: HashMap<&str, &Answer> = all
                .iter()
                .filter(|a| a.sample == 0)
                .map(|a| (a.id.as_str(), a))
                .collect();
            prompts
                .iter()
                .map(|p| {
                    by_id
                        .get(p.id.as_str())
                        .map(|a| (*a).clone())
                        .with_context(|| {
                            format!("no answer to prompt {} in {}", p.id, path.display())
                        })
                })
                .collect()
        })
        .collect()
}

/// Last-prompt-token log-probabilities (log-softmax) per prompt, under `steering`.
fn next_token_logprobs(
    model: &Model,
    tokens: &[Vec<u32>],
    batch: usize,
    recipe: Option<&Recipe>,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
    by_length(&lengths, batch, |members| {
        let mut hooks = hooks_for(model, recipe)?;
        let refs: Vec<&[u32]> = members.iter().map(|&i| tokens[i].as_slice()).collect();
        let (_, logits) = prefill(model, &refs, Padding::Left, 0, &mut hooks, Logits::Last)?;
        Ok(logits
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::MIN, f32::max);
                let log_z = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                row.iter().map(|x| x - log_z).collect()
            })
            .collect())
    })
}

/// The unsteered model's next-token log-probabilities after token sequences it has read,
/// kept for reuse: every condition of a run reads the same unsteered rows (a gated one, those
/// its gate keeps out; the KL, the same prompts at every trial).
#[derive(Default)]
pub struct UnsteeredLogprobs(HashMap<Vec<u32>, Vec<f32>>);

impl UnsteeredLogprobs {
    /// The row after each of `tokens`, reading only those not held yet.
    fn read(&mut self, model: &Model, tokens: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let unread: Vec<Vec<u32>> = tokens
            .iter()
            .filter(|t| !self.0.contains_key(*t))
            .cloned()
            .collect();
        let rows = next_token_logprobs(model, &unread, batch, None)?;
        self.0.extend(unread.into_iter().zip(rows));
        Ok(tokens.iter().map(|t| self.0[t].clone()).collect())
    }
}

/// Log-probabilities after each text: steered where `steered[i]`, else unsteered (from
/// `unsteered`).
fn mixed_logprobs(
    model: &Model,
    tokens: &[Vec<u32>],
    steered: &[bool],
    batch: usize,
    recipe: Option<&Recipe>,
    unsteered: &mut UnsteeredLogprobs,
) -> Result<Vec<Vec<f32>>> {
    let pick = |want: bool| -> Vec<Vec<u32>> {
        (0..tokens.len())
            .filter(|&i| steered[i] == want)
            .map(|i| tokens[i].clone())
            .collect()
    };
    let mut with = next_token_logprobs(model, &pick(true), batch, recipe)?.into_iter();
    let mut without = unsteered.read(model, &pick(false), batch)?.into_iter();
    Ok(steered
        .iter()
        .map(|&s| if s { with.next() } else { without.next() }.expect("one row per text"))
        .collect())
}

/// Mean KL(unsteered || steered) of the next-token distribution after each prompt, in nats
/// (0 for prompts a gate leaves unsteered); the unsteered side from `unsteered` where it holds
/// it (every trial of a stage measures the same prompts).
pub fn mean_kl(
    model: &Model,
    prompts: &[Prompt],
    format: &Format,
    batch: usize,
    recipe: Option<&Recipe>,
    unsteered: &mut UnsteeredLogprobs,
) -> Result<f64> {
    let texts: Vec<String> = prompts.iter().map(|p| p.prompt.clone()).collect();
    let steered = selection(recipe, model, format, &texts, batch)?;
    let tokens: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&steered)
        .filter(|(_, &s)| s)
        .map(|(p, _)| format.encode(model, &p.prompt))
        .collect::<Result<_>>()?;
    let base = unsteered.read(model, &tokens, batch)?;
    let after = next_token_logprobs(model, &tokens, batch, recipe)?;
    let total: f64 = base
        .iter()
        .zip(&after)
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(&lp, &lq)| f64::from(lp.exp()) * f64::from(lp - lq))
                .sum::<f64>()
        })
        // fold from +0: an empty float sum is -0, which would print as "-0.000".
        .fold(0.0, |a, b| a + b);
    Ok(total / prompts.len().max(1) as f64)
}

/// Accuracy on multiple-choice items: the option letter with the highest next-token
/// probability after the question (no generation).
pub fn choice_accuracy(
    model: &Model,
    items: &[Choice],
    format: &Format,
    batch: usize,
    recipe: Option<&Recipe>,
    unsteered: &mut UnsteeredLogprobs,
) -> Result<f64> {
    let texts: Vec<String> = items.iter().map(Choice::prompt).collect();
    let steered = selection(recipe, model, format, &texts, batch)?;
    let tokens: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| format.encode(model, t))
        .collect::<Result<_>>()?;
    let logprobs = mixed_logprobs(model, &tokens, &steered, batch, recipe, unsteered)?;
    // A letter may be written with or without a leading space; either counts.
    let letter_tokens = |label: &str| -> Vec<u32> {
        [label.to_string(), format!(" {label}")]
            .iter()
            .filter_map(
                |t| match model.tokenizer.encode(t, false, false).as_slice() {
                    [one] => Some(*one),
                    _ => None,
                },
            )
            .collect()
    };
    let mut correct = 0;
    for (item, lp) in items.iter().zip(&logprobs) {
        let score = |label: &str| {
            letter_tokens(label)
                .iter()
                .map(|&t| lp[t as usize])
                .fold(f32::MIN, f32::max)
        };
        let best = item
            .options
            .iter()
            .map(|(label, _)| (label, score(label)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(label, _)| label.clone());
        if best.as_deref() == Some(item.answer.as_str()) {
            correct += 1;
        }
    }
    Ok(correct as f64 / items.len().max(1) as f64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Ten answers, `refusals` of them refusals, `degenerate` of those loops.
    pub(crate) fn ten_answers(refusals: usize, degenerate: usize) -> SetRate {
        SetRate {
            n: 10,
            refusals,
            rate: refusals as f64 / 10.0,
            ci: wilson(refusals, 10),
            pattern_refusals: refusals,
            degenerate,
            kinds: BTreeMap::new(),
            scores: Vec::new(),
            gated_in: None,
        }
    }

    #[test]
    fn rates_count_the_refusal_types_the_judge_gave() {
        use refusal_steer_judge::{Degeneracy, Verdict};
        let said = |label, kind, degenerate| {
            let verdict = Verdict {
                label,
                p_refusal: None,
                kind,
            };
            let patterns = Verdict {
                label: -1,
                p_refusal: None,
                kind: None,
            };
            (
                Assessment {
                    verdict,
                    degenerate,
                },
                Assessment {
                    verdict: patterns,
                    degenerate,
                },
            )
        };
        let rate = rate(&[
            said(1, Some(VerdictKind::Narrative), None),
            said(1, Some(VerdictKind::Narrative), None),
            said(1, Some(VerdictKind::Lang), None),
            said(1, Some(VerdictKind::Refusal), None),
            said(1, Some(VerdictKind::Degenerate), None),
            said(1, Some(VerdictKind::Degenerate), Some(Degeneracy::Loop)),
            said(-1, None, None),
            said(-1, None, None),
        ]);
        assert_eq!((rate.refusals, rate.degenerate), (6, 2));
        assert_eq!(rate.percent(), "75% (2 degenerate, 2 narrative, 1 lang)");
        // Reports written before refusal types existed still read.
        let mut old = serde_json::to_value(&rate).unwrap();
        old.as_object_mut().unwrap().remove("kinds");
        let back: SetRate = serde_json::from_value(old).unwrap();
        assert!(back.kinds.is_empty());
    }

    #[test]
    fn rows_of_any_length_read_together_equal_each_read_alone() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let (_dir, model) = crate::testing::tiny_model();
        // Lengths out of order, so the length sort moves rows between batches.
        let tokens: Vec<Vec<u32>> = vec![
            vec![5, 6, 7, 8, 9],
            vec![8],
            vec![10, 11, 12],
            vec![13, 14],
            vec![6, 6, 6, 6],
        ];
        let together = next_token_logprobs(&model, &tokens, 2, None).unwrap();
        for (row, t) in together.iter().zip(&tokens) {
            let alone = next_token_logprobs(&model, std::slice::from_ref(t), 1, None).unwrap();
            assert_eq!(row, &alone[0], "{t:?}");
        }
    }

    #[test]
    fn unsteered_rows_are_read_once_and_then_reused() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let (_dir, model) = crate::testing::tiny_model();
        let tokens: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![8, 9], vec![10, 11, 12, 13]];
        let read = next_token_logprobs(&model, &tokens, 2, None).unwrap();
        let mut memo = UnsteeredLogprobs::default();
        let steered = [false; 3];
        let first = mixed_logprobs(&model, &tokens, &steered, 2, None, &mut memo).unwrap();
        assert_eq!(first, read);
        // What is held is what a later call gets: a planted row shows it is not read again.
        memo.0.get_mut(&tokens[1]).unwrap()[0] = 42.0;
        let again =
            mixed_logprobs(&model, &tokens[1..], &steered[1..], 2, None, &mut memo).unwrap();
        assert_eq!(again[0][0], 42.0);
        assert_eq!(again[1], read[2]);
    }

    #[test]
    fn wilson_intervals_match_known_values() {
        // 5/10: 0.2366 .. 0.7634 (standard tables).
        let (lo, hi) = wilson(5, 10);
        assert!((lo - 0.2366).abs() < 1e-3 && (hi - 0.7634).abs() < 1e-3);
        let (lo, hi) = wilson(0, 12);
        assert!(lo.abs() < 1e-12);
        assert!((hi - 0.2425).abs() < 1e-3, "{hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn degenerate_answers_never_count_toward_the_aim() {
        // Ten loops: every answer misses both aims.
        assert_eq!(ten_answers(10, 10).missed(Direction::Remove), 1.0);
        assert_eq!(ten_answers(10, 10).missed(Direction::Induce), 1.0);
        // Eight refusals, two of them loops: six real refusals induced, eight left to remove.
        assert!((ten_answers(8, 2).missed(Direction::Induce) - 0.4).abs() < 1e-12);
        assert!((ten_answers(8, 2).missed(Direction::Remove) - 0.8).abs() < 1e-12);
        assert_eq!(ten_answers(8, 2).percent(), "80% (2 degenerate)");
        assert_eq!(ten_answers(8, 0).percent(), "80%");
    }
}
