//! The open file formats that connect refusal-steer's stages.
//!
//! - Prompts: JSONL, one object per line with at least `id` (string or number) and `prompt`,
//!   optionally `set` and any other fields (kept, ignored).
//! - Answers: JSONL, one [`Answer`] per (prompt id, sample).
//! - Every output is append-only JSONL keyed by id, so an interrupted run resumes where it
//!   stopped: finished keys are skipped, and a half-written last line is cut off.

pub mod activations;
pub mod lock;

/// A per-prompt refusal confidence `c` in [-1, 1] (a scores file's `c`) above this is a
/// refusal, below its negative a compliance, and in between neither: the one cut every
/// stage classifies prompts by.
pub const CONFIDENCE_THRESHOLD: f64 = 0.1;

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {detail}")]
    Line {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{path}: no prompts found; expected JSONL lines like {{\"id\": \"1\", \"prompt\": \"...\"}}")]
    Empty { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, DataError>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
}

/// One generated answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub id: String,
    pub sample: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    pub prompt: String,
    pub answer: String,
    pub n_tokens: usize,
    pub mean_logprob: f32,
    pub finish_reason: String,
    /// Description of the steering applied, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<serde_json::Value>,
}

/// A record's id: a string, or a number written as its decimal text. Every file keyed by
/// prompt id reads ids with this rule.
pub fn record_id(value: Option<&serde_json::Value>) -> Option<String> {
    match value {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a JSONL prompt file. Ids may be strings or numbers; every malformed line is
/// reported with its line number. Duplicate ids are an error (outputs are keyed by id).
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut prompts = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |detail: String| DataError::Line {
            path: path.to_path_buf(),
            line: line_no,
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let id = match (obj.get("id"), record_id(obj.get("id"))) {
            (_, Some(id)) => id,
            (Some(_), None) => return Err(bad("\"id\" must be a string or a number".into())),
            (None, None) => return Err(bad("missing \"id\"".into())),
        };
        let prompt = match obj.get("prompt") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("\"prompt\" must be a string".into())),
            None => return Err(bad("missing \"prompt\"".into())),
        };
        let set = obj.get("set").and_then(|s| s.as_str()).map(str::to_string);
        if !seen.insert(id.clone()) {
            return Err(bad(format!("duplicate id \"{id}\"; ids must be unique")));
        }
        prompts.push(Prompt { id, prompt, set });
    }
    if prompts.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(prompts)
}

/// An append-only JSONL file of records, opened for resuming: records already present are
/// read back, and a half-written last line (from a killed run) is cut off first.
pub struct JsonlAppender {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl JsonlAppender {
    /// Opens (or creates) `path`, returning the appender and the complete records already in it.
    pub fn open<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<(Self, Vec<T>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_err(path))?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let mut records = Vec::new();
        for (n, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str(line).map_err(|e| DataError::Line {
                path: path.to_path_buf(),
                line: n + 1,
                detail: format!(
                    "existing output line does not parse ({e}); move the file away to start over"
                ),
            })?;
            records.push(record);
        }
        if complete < text.len() {
            file.set_len(complete as u64).map_err(io_err(path))?;
            file.seek(SeekFrom::End(0)).map_err(io_err(path))?;
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                writer: BufWriter::new(file),
            },
            records,
        ))
    }

    /// Appends one record and flushes it, so a kill loses at most the line being written.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("records serialize");
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(io_err(&self.path))?;
        self.writer.flush().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"id\": 1, \"prompt\": \"a\"}\n\n{\"id\": 2, \"prompt\": \"b\"\n",
        )
        .unwrap();
        let err = read_prompts(&path).unwrap_err().to_string();
        assert!(
            err.contains("p.jsonl:3") && err.contains("not valid JSON"),
            "{err}"
        );
        std::fs::write(&path, "{\"id\": 1, \"text\": \"a\"}\n").unwrap();
        assert!(read_prompts(&path)
            .unwrap_err()
            .to_string()
            .contains(":1: missing \"prompt\""));
        std::fs::write(
            &path,
            "{\"id\": 1, \"prompt\": \"a\"}\n{\"id\": \"1\", \"prompt\": \"b\"}\n",
        )
        .unwrap();
        assert!(read_prompts(&path)
            .unwrap_err()
            .to_string()
            .contains("duplicate id"));
    }

    #[test]
    fn numeric_and_string_ids_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"id\": 7, \"prompt\": \"a\", \"set\": \"x\"}\n{\"id\": \"b\", \"prompt\": \"c\"}\n",
        )
        .unwrap();
        let p = read_prompts(&path).unwrap();
        assert_eq!(
            p[0],
            Prompt {
                id: "7".into(),
                prompt: "a".into(),
                set: Some("x".into())
            }
        );
        assert_eq!(p[1].id, "b");
    }

    #[test]
    fn appender_resumes_and_cuts_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        {
            let (mut w, old) = JsonlAppender::open::<serde_json::Value>(&path).unwrap();
            assert!(old.is_empty());
            w.append(&serde_json::json!({"id": "a"})).unwrap();
        }
        // Simulate a kill in the middle of the second line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\": \"b").unwrap();
        drop(f);
        let (mut w, old) = JsonlAppender::open::<serde_json::Value>(&path).unwrap();
        assert_eq!(old, vec![serde_json::json!({"id": "a"})]);
        w.append(&serde_json::json!({"id": "c"})).unwrap();
        drop(w);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"c\"}\n"
        );
    }
}
