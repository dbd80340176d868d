//! The extra prompts a run's topic gate is trained on (`gate_corpus` in the run config): the
//! built-in China-political corpus or a file of one's own, a seeded sample per set, minus every
//! prompt the run answers.

use super::GateLabel;
use crate::config::GateCorpus;
use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use refusal_steer_data::Prompt;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// A corpus line: a prompt and, optionally, the source it was drawn from.
#[derive(Deserialize)]
struct Line {
    #[serde(flatten)]
    prompt: Prompt,
    source: Option<String>,
}

/// A prompt drawn for the gate.
#[derive(Debug)]
pub struct Drawn {
    pub prompt: Prompt,
    pub label: GateLabel,
    /// What the gate's cuts hold out together: `gate:` and the line's `source` (its set where
    /// it has none).
    pub group: String,
}

/// `data/gate/prompts.jsonl` (`data/gate/README.md` says how it was made).
const BUILT_IN: &str = include_str!("../../../../data/gate/prompts.jsonl");

/// The corpus's prompts drawn for the gate, each with its label and group; `exclude` holds
/// the texts the run answers (none of them is drawn). Ids are prefixed `gate:` so they never
/// meet the run's own.
pub fn draw(
    corpus: &GateCorpus,
    data_dir: &Path,
    seed: u64,
    exclude: &HashSet<&str>,
) -> Result<Vec<Drawn>> {
    let (text, name) = match corpus.prompts.as_str() {
        "built-in" => (BUILT_IN.to_string(), "the built-in gate corpus".to_string()),
        path => {
            let path = data_dir.join(path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the gate corpus {}", path.display()))?;
            (text, path.display().to_string())
        }
    };
    let mut by_set: BTreeMap<String, Vec<(Prompt, String)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(line).with_context(|| {
            format!(
                "{name} line {}: not a prompt (\"id\", \"prompt\", \"set\")",
                i + 1
            )
        })?;
        let Some(set) = line.prompt.set.clone() else {
            bail!("{name} line {}: the prompt has no \"set\"", i + 1);
        };
        let group = format!("gate:{}", line.source.as_deref().unwrap_or(&set));
        by_set.entry(set).or_default().push((line.prompt, group));
    }
    for set in corpus.on.iter().chain(&corpus.harmful) {
        if !by_set.contains_key(set) {
            bail!(
                "the gate corpus names set \"{set}\", but {name} has only {:?}",
                by_set.keys().collect::<Vec<_>>()
            );
        }
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut drawn = Vec::new();
    for (set, mut prompts) in by_set {
        prompts.retain(|(p, _)| !exclude.contains(p.prompt.as_str()));
        prompts.shuffle(&mut rng);
        let label = if corpus.on.contains(&set) {
            GateLabel::OnTopic
        } else if corpus.harmful.contains(&set) {
            GateLabel::Harmful
        } else {
            GateLabel::OffTopic
        };
        for (mut prompt, group) in prompts.into_iter().take(corpus.per_set) {
            prompt.id = format!("gate:{}", prompt.id);
            drawn.push(Drawn {
                prompt,
                label,
                group,
            });
        }
    }
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_corpus_is_drawn_per_set_without_the_runs_prompts() {
        let corpus = GateCorpus {
            prompts: "built-in".into(),
            on: vec!["china".into(), "contrast".into()],
            harmful: vec!["harmful".into()],
            per_set: 5,
        };
        let all = draw(&corpus, Path::new("."), 0, &HashSet::new()).unwrap();
        assert_eq!(all.len(), 25, "five sets, five each");
        let excluded: HashSet<&str> = all.iter().map(|d| d.prompt.prompt.as_str()).collect();
        let again = draw(&corpus, Path::new("."), 0, &excluded).unwrap();
        assert!(again
            .iter()
            .all(|d| !excluded.contains(d.prompt.prompt.as_str())));
        let labels = |set: &str| {
            all.iter()
                .filter(|d| d.prompt.set.as_deref() == Some(set))
                .map(|d| d.label)
                .collect::<HashSet<_>>()
        };
        assert_eq!(labels("china"), HashSet::from([GateLabel::OnTopic]));
        assert_eq!(labels("harmful"), HashSet::from([GateLabel::Harmful]));
        assert_eq!(
            labels("other-country"),
            HashSet::from([GateLabel::OffTopic])
        );
        assert!(all.iter().all(|d| d.prompt.id.starts_with("gate:")));
        // A templated phrasing is one group for China and the other countries alike.
        assert!(all
            .iter()
            .filter(|d| d.prompt.id.contains("template-other-essay"))
            .all(|d| d.group == "gate:template-essay"));
        let wrong = GateCorpus {
            on: vec!["tibet".into()],
            ..corpus
        };
        let err = draw(&wrong, Path::new("."), 0, &HashSet::new()).unwrap_err();
        assert!(err.to_string().contains("names set \"tibet\""), "{err}");
    }
}
