//! Prompt sets read from data files in their own formats, and seeded train / validation / test
//! splits.

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use refusal_steer_data::Prompt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One file of a set: prompts (TXT one per line, CSV column, JSON array or JSONL objects with a
/// text field) or multiple-choice items (`mmlu` CSV, `arc` JSONL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Relative to the run's data directory, or absolute.
    pub path: PathBuf,
    /// The column or field holding the prompt (CSV/JSON/JSONL); not used for TXT.
    #[serde(default)]
    pub field: Option<String>,
    /// Keep only rows whose fields have these values, e.g. { label = "safe" }.
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, String>,
    /// Take this many rows at random (seeded) instead of all.
    #[serde(default)]
    pub sample: Option<usize>,
    /// `prompts` (default), `mmlu` or `arc` (multiple choice).
    #[serde(default)]
    pub kind: SourceKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    #[default]
    Prompts,
    Mmlu,
    Arc,
}

/// A multiple-choice question with its correct option.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub id: String,
    pub question: String,
    /// (label, text), e.g. ("A", "Paris").
    pub options: Vec<(String, String)>,
    pub answer: String,
}

impl Choice {
    /// The question as the model reads it; its answer is the next token, a letter.
    pub fn prompt(&self) -> String {
        let mut text = format!(
            "Answer the multiple-choice question with the letter of the correct option only.\n\n{}\n",
            self.question.trim()
        );
        for (label, option) in &self.options {
            text.push_str(&format!("{label}. {}\n", option.trim()));
        }
        text.push_str("Answer:");
        text
    }
}

/// Rows of a source as field maps, in file order.
fn read_rows(path: &Path) -> Result<Vec<BTreeMap<String, serde_json::Value>>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let object = |v: serde_json::Value, at: &dyn Fn() -> String| -> Result<_> {
        match v {
            serde_json::Value::Object(map) => Ok(map.into_iter().collect()),
            _ => bail!("{}: expected a JSON object", at()),
        }
    };
    Ok(match ext {
        "txt" => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| BTreeMap::from([("text".to_string(), serde_json::Value::from(l.trim()))]))
            .collect(),
        "csv" => {
            let mut reader = csv::Reader::from_reader(text.as_bytes());
            let headers = reader
                .headers()
                .with_context(|| format!("{}: no CSV header", path.display()))?
                .clone();
            let mut rows = Vec::new();
            for (n, record) in reader.records().enumerate() {
                let record =
                    record.with_context(|| format!("{}: CSV row {}", path.display(), n + 2))?;
                rows.push(
                    headers
                        .iter()
                        .zip(record.iter())
                        .map(|(h, v)| (h.to_string(), serde_json::Value::from(v)))
                        .collect(),
                );
            }
            rows
        }
        "json" => {
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            let serde_json::Value::Array(items) = value else {
                bail!("{}: expected a JSON array of objects", path.display())
            };
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| object(v, &|| format!("{} item {i}", path.display())))
                .collect::<Result<_>>()?
        }
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                let at = || format!("{}:{}", path.display(), n + 1);
                let v =
                    serde_json::from_str(l).with_context(|| format!("{}: not valid JSON", at()))?;
                object(v, &at)
            })
            .collect::<Result<_>>()?,
        other => bail!(
            "{}: unknown file type '.{other}'; sets are read from .txt, .csv, .json or .jsonl",
            path.display()
        ),
    })
}

fn text_of(row: &BTreeMap<String, serde_json::Value>, key: &str) -> Option<String> {
    match row.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Picks `k` of `n` indices at random (seeded), kept in source order.
fn sample_indices(n: usize, k: Option<usize>, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if let Some(k) = k.filter(|&k| k < n) {
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        idx.truncate(k);
        idx.sort_unstable();
    }
    idx
}

/// A stable name for a source in prompt ids: its file stem.
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "source".into())
}

/// The source of each prompt that [`load_prompts`] makes of `sources` for `set`, by id: the set
/// and file stem, and the source's filter where it has one (`target/mmlu[subject=anatomy]`), so
/// that subjects drawn from one file count as sources of their own.
pub fn source_names(
    sources: &[Source],
    data_dir: &Path,
    set: &str,
) -> Result<BTreeMap<String, String>> {
    let mut names = BTreeMap::new();
    for source in sources {
        let every_row = Source {
            sample: None,
            ..source.clone()
        };
        let filter: Vec<String> = source
            .filter
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let name = match filter.is_empty() {
            true => format!("{set}/{}", stem(&source.path)),
            false => format!("{set}/{}[{}]", stem(&source.path), filter.join(",")),
        };
        for prompt in load_prompts(&every_row, data_dir, set, 0)? {
            names.insert(prompt.id, name.clone());
        }
    }
    Ok(names)
}

/// Reads a prompt source; ids are `{set}/{file stem}/{row index}`.
pub fn load_prompts(source: &Source, data_dir: &Path, set: &str, seed: u64) -> Result<Vec<Prompt>> {
    let path = data_dir.join(&source.path);
    let rows = read_rows(&path)?;
    let is_txt = path.extension().is_some_and(|e| e == "txt");
    let field = match (&source.field, is_txt) {
        (_, true) => "text".to_string(),
        (Some(f), false) => f.clone(),
        (None, false) => bail!(
            "{}: say which field holds the prompt (field = \"...\"); the first row has {:?}",
            path.display(),
            rows.first()
                .map(|r| r.keys().collect::<Vec<_>>())
                .unwrap_or_default()
        ),
    };
    let mut kept = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if source
            .filter
            .iter()
            .all(|(k, v)| text_of(row, k).as_deref() == Some(v.as_str()))
        {
            let Some(text) = text_of(row, &field) else {
                bail!(
                    "{} row {i}: no text field \"{field}\" (it has {:?})",
                    path.display(),
                    row.keys().collect::<Vec<_>>()
                )
            };
            kept.push((i, text));
        }
    }
    if kept.is_empty() {
        bail!(
            "{}: no rows left after the filter {:?}",
            path.display(),
            source.filter
        );
    }
    let name = stem(&path);
    Ok(sample_indices(kept.len(), source.sample, seed)
        .into_iter()
        .map(|j| Prompt {
            id: format!("{set}/{name}/{}", kept[j].0),
            prompt: kept[j].1.clone(),
            set: Some(set.to_string()),
        })
        .collect())
}

/// Reads a multiple-choice source (`mmlu` CSV with question,A,B,C,D,answer; `arc` JSONL).
pub fn load_choices(source: &Source, data_dir: &Path, seed: u64) -> Result<Vec<Choice>> {
    let path = data_dir.join(&source.path);
    let rows = read_rows(&path)?;
    let name = stem(&path);
    let mut items = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let bad = |what: &str| anyhow::anyhow!("{} row {i}: {what}", path.display());
        let item = match source.kind {
            SourceKind::Mmlu => Choice {
                id: format!("{name}/{i}"),
                question: text_of(row, "question").ok_or_else(|| bad("no \"question\""))?,
                options: ["A", "B", "C", "D"]
                    .iter()
                    .map(|l| {
                        Ok((
                            l.to_string(),
                            text_of(row, l).ok_or_else(|| bad("missing an option column A-D"))?,
                        ))
                    })
                    .collect::<Result<_>>()?,
                answer: text_of(row, "answer").ok_or_else(|| bad("no \"answer\""))?,
            },
            SourceKind::Arc => {
                let q = row.get("question").ok_or_else(|| bad("no \"question\""))?;
                let options = q["choices"]
                    .as_array()
                    .ok_or_else(|| bad("no question.choices"))?
                    .iter()
                    .map(|c| {
                        Ok((
                            c["label"]
                                .as_str()
                                .ok_or_else(|| bad("a choice has no label"))?
                                .to_string(),
                            c["text"]
                                .as_str()
                                .ok_or_else(|| bad("a choice has no text"))?
                                .to_string(),
                        ))
                    })
                    .collect::<Result<_>>()?;
                Choice {
                    id: format!("{name}/{i}"),
                    question: q["stem"]
                        .as_str()
                        .ok_or_else(|| bad("no question.stem"))?
                        .to_string(),
                    options,
                    answer: text_of(row, "answerKey").ok_or_else(|| bad("no \"answerKey\""))?,
                }
            }
            SourceKind::Prompts => bail!(
                "{}: not a multiple-choice source (kind = \"mmlu\" or \"arc\")",
                path.display()
            ),
        };
        if !item.options.iter().any(|(l, _)| *l == item.answer) {
            return Err(bad(&format!(
                "answer \"{}\" is not one of the options",
                item.answer
            )));
        }
        items.push(item);
    }
    Ok(sample_indices(items.len(), source.sample, seed)
        .into_iter()
        .map(|j| items[j].clone())
        .collect())
}

/// The three parts of a set. The test part is read only by the final evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split<T> {
    pub train: Vec<T>,
    pub validation: Vec<T>,
    pub test: Vec<T>,
}

/// Shuffles `items` with `seed` and cuts `sizes` = (train, validation, test) off the front.
pub fn split<T: Clone>(items: &[T], sizes: [usize; 3], seed: u64, set: &str) -> Result<Split<T>> {
    let need: usize = sizes.iter().sum();
    if need > items.len() {
        bail!(
            "set \"{set}\" has {} items, but its split asks for {need} ({} train + {} validation + {} test); lower the sizes or add sources",
            items.len(),
            sizes[0],
            sizes[1],
            sizes[2]
        );
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let take = |from: usize, n: usize| {
        order[from..from + n]
            .iter()
            .map(|&i| items[i].clone())
            .collect()
    };
    Ok(Split {
        train: take(0, sizes[0]),
        validation: take(sizes[0], sizes[1]),
        test: take(sizes[0] + sizes[1], sizes[2]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(path: &str) -> Source {
        Source {
            path: path.into(),
            field: None,
            filter: BTreeMap::new(),
            sample: None,
            kind: SourceKind::Prompts,
        }
    }

    #[test]
    fn every_format_reads_with_filters_and_samples() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.txt"), "one\n\n two \nthree\n").unwrap();
        std::fs::write(d.join("b.csv"), "prompt,label\n\"x, y\",safe\nz,unsafe\n").unwrap();
        std::fs::write(
            d.join("c.json"),
            r#"[{"instruction": "i0"}, {"instruction": "i1"}]"#,
        )
        .unwrap();
        std::fs::write(d.join("d.jsonl"), "{\"q\": \"j0\"}\n{\"q\": \"j1\"}\n").unwrap();
        let txt = load_prompts(&source("a.txt"), d, "t", 0).unwrap();
        assert_eq!(
            txt.iter().map(|p| p.prompt.as_str()).collect::<Vec<_>>(),
            ["one", "two", "three"]
        );
        assert_eq!(txt[1].id, "t/a/1");
        let csv = Source {
            field: Some("prompt".into()),
            filter: BTreeMap::from([("label".into(), "safe".into())]),
            ..source("b.csv")
        };
        let rows = load_prompts(&csv, d, "b", 0).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].prompt, "x, y");
        let json = Source {
            field: Some("instruction".into()),
            sample: Some(1),
            ..source("c.json")
        };
        assert_eq!(load_prompts(&json, d, "c", 3).unwrap().len(), 1);
        let jsonl = Source {
            field: Some("q".into()),
            ..source("d.jsonl")
        };
        assert_eq!(load_prompts(&jsonl, d, "d", 0).unwrap()[1].prompt, "j1");
        // Same seed, same sample.
        let s = Source {
            sample: Some(2),
            ..source("a.txt")
        };
        assert_eq!(
            load_prompts(&s, d, "t", 5).unwrap(),
            load_prompts(&s, d, "t", 5).unwrap()
        );
    }

    #[test]
    fn subjects_of_one_file_are_sources_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("m.csv"), "q,subject\na,law\nb,art\nc,law\nd,art\n").unwrap();
        std::fs::write(d.join("p.txt"), "one\ntwo\n").unwrap();
        let subject = |s: &str| Source {
            field: Some("q".into()),
            filter: BTreeMap::from([("subject".into(), s.into())]),
            sample: Some(1),
            ..source("m.csv")
        };
        let names =
            source_names(&[subject("law"), subject("art"), source("p.txt")], d, "t").unwrap();
        // Every row a filter keeps is named, whatever the sample draws.
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                ("t/m/0", "t/m[subject=law]"),
                ("t/m/1", "t/m[subject=art]"),
                ("t/m/2", "t/m[subject=law]"),
                ("t/m/3", "t/m[subject=art]"),
                ("t/p/0", "t/p"),
                ("t/p/1", "t/p"),
            ]
            .map(|(id, name)| (id.to_string(), name.to_string()))
        );
    }

    #[test]
    fn bad_sources_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.csv"), "prompt,label\nx,safe\n").unwrap();
        let err = |s: Source| load_prompts(&s, d, "s", 0).unwrap_err().to_string();
        assert!(err(source("missing.txt")).contains("missing.txt"));
        assert!(err(source("b.csv")).contains("say which field"));
        assert!(err(Source {
            field: Some("nope".into()),
            ..source("b.csv")
        })
        .contains("no text field"));
        let filtered = Source {
            field: Some("prompt".into()),
            filter: BTreeMap::from([("label".into(), "other".into())]),
            ..source("b.csv")
        };
        assert!(err(filtered).contains("no rows left"));
        std::fs::write(d.join("x.xml"), "").unwrap();
        assert!(err(source("x.xml")).contains("unknown file type"));
    }

    #[test]
    fn multiple_choice_sources_read_mmlu_and_arc() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("m.csv"),
            "subject,question,A,B,C,D,answer\ns,What?,a,b,c,d,C\n",
        )
        .unwrap();
        std::fs::write(
            d.join("arc.jsonl"),
            r#"{"id": "x", "question": {"stem": "Why?", "choices": [{"text": "t1", "label": "A"}, {"text": "t2", "label": "B"}]}, "answerKey": "B"}"#,
        )
        .unwrap();
        let m = load_choices(
            &Source {
                kind: SourceKind::Mmlu,
                ..source("m.csv")
            },
            d,
            0,
        )
        .unwrap();
        assert_eq!(m[0].answer, "C");
        assert!(m[0].prompt().ends_with("D. d\nAnswer:"));
        let a = load_choices(
            &Source {
                kind: SourceKind::Arc,
                ..source("arc.jsonl")
            },
            d,
            0,
        )
        .unwrap();
        assert_eq!(a[0].options[1], ("B".to_string(), "t2".to_string()));
    }

    #[test]
    fn splits_are_deterministic_disjoint_and_checked() {
        let items: Vec<u32> = (0..20).collect();
        let a = split(&items, [5, 3, 4], 7, "s").unwrap();
        assert_eq!(a, split(&items, [5, 3, 4], 7, "s").unwrap());
        assert_ne!(a, split(&items, [5, 3, 4], 8, "s").unwrap());
        let mut all: Vec<u32> = a
            .train
            .iter()
            .chain(&a.validation)
            .chain(&a.test)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 12);
        let err = split(&items, [10, 10, 10], 0, "safety")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"safety\" has 20 items") && err.contains("30"),
            "{err}"
        );
    }
}
