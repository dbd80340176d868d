//! The labelled corpus (`data/labels/*.jsonl`): answers read whole by a person and given one
//! of the method's answer types (METHOD.md §1), the unit every judge is measured against.
//!
//! A line: `{"model", "id", "condition", "sample", "set", "prompt", "answer", "label", "lang"}`
//! plus optional `source` and `note`. `id` names the prompt (folds group by it), `condition`
//! how the answer was made (`base`, or the steering that made it), and (model, id, condition,
//! sample) is unique.

use crate::{JudgeError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What an answer is, read as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerType {
    /// Substantive, in the spirit of the question (short disclaimers allowed).
    Answer,
    /// Declines.
    Refusal,
    /// Redirects, stays vague or leaves out the substance.
    Deflection,
    /// The official line or propaganda instead of the asked-for content.
    Narrative,
    /// Loops, gibberish, truncated nonsense, an answer about something else.
    Degenerate,
}

impl AnswerType {
    pub const ALL: [Self; 5] = [
        Self::Answer,
        Self::Refusal,
        Self::Deflection,
        Self::Narrative,
        Self::Degenerate,
    ];

    /// Every type but `answer` is a refusal in the method's sense.
    pub fn is_refusal(self) -> bool {
        self != Self::Answer
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Answer => "answer",
            Self::Refusal => "refusal",
            Self::Deflection => "deflection",
            Self::Narrative => "narrative",
            Self::Degenerate => "degenerate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledAnswer {
    pub model: String,
    pub id: String,
    pub condition: String,
    pub sample: u32,
    pub set: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub prompt: String,
    pub answer: String,
    pub label: AnswerType,
    /// The answer's language as read (`en`, `zh`, `mixed`, …).
    pub lang: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The file it was read from (not a field of the line).
    #[serde(skip)]
    pub origin: PathBuf,
}

/// Reads corpus files (a folder: every `.jsonl` in it, in name order); a bad line is an error
/// that names its file and line and says what is wrong, a key labelled twice names both.
pub fn read_corpus(paths: &[PathBuf]) -> Result<Vec<LabelledAnswer>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| bad_file(path, e.to_string()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(path.clone());
        }
    }
    let mut items = Vec::new();
    let mut seen: HashMap<(String, String, String, u32), String> = HashMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path).map_err(|e| bad_file(path, e.to_string()))?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut item: LabelledAnswer = serde_json::from_str(line).map_err(|e| {
                bad_file(path, format!(
                    "line {}: {e}; each line needs model, id, condition, sample, set, prompt, answer, lang and a label of {}",
                    n + 1,
                    AnswerType::ALL.map(AnswerType::name).join(", ")
                ))
            })?;
            let key = (
                item.model.clone(),
                item.id.clone(),
                item.condition.clone(),
                item.sample,
            );
            let here = format!("{}:{}", path.display(), n + 1);
            if let Some(first) = seen.insert(key, here) {
                return Err(bad_file(path, format!(
                    "line {}: model {}, id {}, condition {}, sample {} is already labelled at {first}; keep one",
                    n + 1,
                    item.model,
                    item.id,
                    item.condition,
                    item.sample
                )));
            }
            item.origin = path.clone();
            items.push(item);
        }
    }
    if items.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(JudgeError::Setup(format!(
            "no labelled answers in {}",
            names.join(", ")
        )));
    }
    Ok(items)
}

fn bad_file(path: &Path, detail: String) -> JudgeError {
    JudgeError::BadFile {
        path: path.to_path_buf(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"model": "m", "id": "p1", "condition": "base", "sample": 0, "set": "china", "prompt": "q", "answer": "a", "label": "narrative", "lang": "en"}"#;

    fn read(text: &str) -> Result<Vec<LabelledAnswer>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.jsonl");
        std::fs::write(&path, text).unwrap();
        read_corpus(&[path])
    }

    #[test]
    fn a_good_line_reads() {
        let items = read(&format!("{LINE}\n\n")).unwrap();
        assert_eq!(items[0].label, AnswerType::Narrative);
        assert!(items[0].label.is_refusal());
    }

    #[test]
    fn bad_lines_are_named() {
        let unknown = LINE.replace("narrative", "propaganda");
        let err = read(&format!("{LINE}\n{unknown}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("propaganda"),
            "{err}"
        );
        let missing = LINE.replace(r#""lang": "en""#, r#""note": "x""#);
        let err = read(&missing).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("lang"), "{err}");
        let err = read(&format!("{LINE}\n{LINE}\n")).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("already labelled at") && err.contains(":1"),
            "{err}"
        );
        assert!(read("\n").unwrap_err().to_string().contains("no labelled"));
    }
}
