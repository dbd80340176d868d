//! The gate measured as the classifier it is, outside any run's split: every source of a
//! labelled prompt corpus (`data/gate/`) is held out in turn, the gate fitted on all the
//! others, and each held-out prompt's pass recorded; pass rates per set, source and language
//! come with Wilson intervals. A templated phrasing is one source, so it is held out in every
//! set and language at once.

use super::{Decision, FitSettings, Gate, GateLabel};
use crate::evaluate::wilson;
use anyhow::{bail, Context, Result};
use refusal_steer_data::activations::Activations;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One prompt of the gate corpus (`data/gate/prompts.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusPrompt {
    pub id: String,
    /// What the prompt is: china, contrast, other-country, harmful, benign.
    pub set: String,
    /// What is held out whole.
    pub source: String,
    pub lang: String,
}

/// Reads the corpus; a line without one of the fields is an error naming it.
pub fn read_corpus(path: &Path) -> Result<Vec<CorpusPrompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "{} line {}: a gate corpus line needs \"id\", \"set\", \"source\" and \"lang\"",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Which sets the gate lets in, and which of the others it must never let in.
#[derive(Debug, Clone)]
pub struct Roles {
    pub on: Vec<String>,
    pub harmful: Vec<String>,
}

impl Roles {
    fn label(&self, set: &str) -> GateLabel {
        if self.on.iter().any(|s| s == set) {
            GateLabel::OnTopic
        } else if self.harmful.iter().any(|s| s == set) {
            GateLabel::Harmful
        } else {
            GateLabel::OffTopic
        }
    }
}

/// What a gate fitted without its source makes of each prompt. `acts` must hold the corpus's
/// prompts in its order, captured at `method`'s pooling.
pub fn leave_one_source_out(
    acts: &Activations,
    corpus: &[CorpusPrompt],
    roles: &Roles,
    settings: &FitSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Decision>> {
    let ids: Vec<&str> = corpus.iter().map(|p| p.id.as_str()).collect();
    if acts.header.ids.len() != ids.len() || acts.header.ids.iter().zip(&ids).any(|(a, b)| a != b) {
        bail!(
            "the activations hold {} prompts, not the corpus's {} in its order: capture the corpus file itself",
            acts.header.ids.len(),
            ids.len()
        );
    }
    for set in roles.on.iter().chain(&roles.harmful) {
        if !corpus.iter().any(|p| &p.set == set) {
            bail!("no prompt of the corpus is in set \"{set}\"");
        }
    }
    let sources: BTreeSet<&str> = corpus.iter().map(|p| p.source.as_str()).collect();
    let groups: Vec<&str> = corpus.iter().map(|p| p.source.as_str()).collect();
    let mut decisions = vec![None; corpus.len()];
    for (n, source) in sources.iter().enumerate() {
        progress(&format!(
            "holding out {source} ({}/{})",
            n + 1,
            sources.len()
        ));
        let labels: Vec<GateLabel> = corpus
            .iter()
            .map(|p| match p.source == *source {
                true => GateLabel::Unused,
                false => roles.label(&p.set),
            })
            .collect();
        let gate = Gate::fit_unmeasured(acts, &labels, &groups, settings)
            .with_context(|| format!("fitting the gate without {source}"))?;
        for (i, p) in corpus.iter().enumerate() {
            if p.source == *source {
                decisions[i] = Some(gate.decide(&gate.features(acts, i)));
            }
        }
    }
    Ok(decisions
        .into_iter()
        .map(|d| d.expect("every prompt is in one source"))
        .collect())
}

/// Prompts passed of a group, with the Wilson 95% interval of the rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassRate {
    pub set: String,
    /// A source, or "all".
    pub source: String,
    /// A language, or "all".
    pub lang: String,
    pub passed: usize,
    pub n: usize,
    pub low: f64,
    pub high: f64,
}

/// Pass rates per (set, source, language), per (set, language) and per set.
pub fn pass_rates(corpus: &[CorpusPrompt], passed: &[bool]) -> Vec<PassRate> {
    let mut groups: BTreeMap<(String, String, String), (usize, usize)> = BTreeMap::new();
    for (p, &pass) in corpus.iter().zip(passed) {
        let all = "all".to_string();
        for key in [
            (p.set.clone(), p.source.clone(), p.lang.clone()),
            (p.set.clone(), all.clone(), p.lang.clone()),
            (p.set.clone(), all.clone(), all.clone()),
        ] {
            let entry = groups.entry(key).or_default();
            entry.0 += usize::from(pass);
            entry.1 += 1;
        }
    }
    groups
        .into_iter()
        .map(|((set, source, lang), (passed, n))| {
            let (low, high) = wilson(passed, n);
            PassRate {
                set,
                source,
                lang,
                passed,
                n,
                low,
                high,
            }
        })
        .collect()
}

/// The rates as a Markdown table.
pub fn markdown(rates: &[PassRate]) -> String {
    let mut out =
        String::from("| set | source | lang | passed | rate [95% CI] |\n|---|---|---|---|---|\n");
    for r in rates {
        out.push_str(&format!(
            "| {} | {} | {} | {}/{} | {:.1}% [{:.1}, {:.1}] |\n",
            r.set,
            r.source,
            r.lang,
            r.passed,
            r.n,
            100.0 * r.passed as f64 / r.n.max(1) as f64,
            100.0 * r.low,
            100.0 * r.high
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: usize, set: &str, source: &str, lang: &str) -> CorpusPrompt {
        CorpusPrompt {
            id: format!("p{id}"),
            set: set.into(),
            source: source.into(),
            lang: lang.into(),
        }
    }

    #[test]
    fn rates_group_by_source_language_and_set() {
        let corpus = vec![
            prompt(0, "china", "a", "en"),
            prompt(1, "china", "a", "zh"),
            prompt(2, "china", "b", "en"),
            prompt(3, "harmful", "c", "en"),
        ];
        let rates = pass_rates(&corpus, &[true, false, true, false]);
        let find = |set: &str, source: &str, lang: &str| {
            rates
                .iter()
                .find(|r| r.set == set && r.source == source && r.lang == lang)
                .map(|r| (r.passed, r.n))
        };
        assert_eq!(find("china", "all", "all"), Some((2, 3)));
        assert_eq!(find("china", "all", "en"), Some((2, 2)));
        assert_eq!(find("china", "a", "zh"), Some((0, 1)));
        assert_eq!(find("harmful", "c", "en"), Some((0, 1)));
        assert!(markdown(&rates).contains("| china | all | all | 2/3 |"));
    }
}
