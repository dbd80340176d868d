//! Verdicts remembered by a hash of (judge id, mode, prompt, answer), kept in a JSONL file so
//! reruns, repeated answers and other output files judged by the same judge cost nothing.

use crate::{Result, Verdict};
use refusal_steer_data::JsonlAppender;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    #[serde(flatten)]
    verdict: Verdict,
}

#[derive(Default)]
pub struct VerdictCache {
    verdicts: HashMap<String, Verdict>,
    file: Option<JsonlAppender>,
}

impl VerdictCache {
    /// A cache that lives only as long as this value.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens (or creates) a cache file; a half-written last line from a killed run is cut off.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, entries) = JsonlAppender::open::<Entry>(path)?;
        Ok(Self {
            verdicts: entries.into_iter().map(|e| (e.key, e.verdict)).collect(),
            file: Some(file),
        })
    }

    pub fn len(&self) -> usize {
        self.verdicts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.verdicts.is_empty()
    }

    pub fn get(&self, judge: &str, mode: &str, prompt: &str, answer: &str) -> Option<Verdict> {
        self.verdicts
            .get(&key(judge, mode, prompt, answer))
            .copied()
    }

    pub fn insert(
        &mut self,
        judge: &str,
        mode: &str,
        prompt: &str,
        answer: &str,
        verdict: Verdict,
    ) -> Result<()> {
        let key = key(judge, mode, prompt, answer);
        if let Some(file) = &mut self.file {
            file.append(&Entry {
                key: key.clone(),
                verdict,
            })?;
        }
        self.verdicts.insert(key, verdict);
        Ok(())
    }
}

/// Length-prefixed fields, so no two different tuples hash the same bytes.
fn key(judge: &str, mode: &str, prompt: &str, answer: &str) -> String {
    let mut hash = Sha256::new();
    for field in [judge, mode, prompt, answer] {
        hash.update((field.len() as u64).to_le_bytes());
        hash.update(field.as_bytes());
    }
    hex::encode(&hash.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VerdictKind;

    #[test]
    fn verdicts_survive_a_reopen_and_keys_separate_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let v = Verdict {
            label: 1,
            p_refusal: Some(0.75),
            kind: Some(VerdictKind::Narrative),
        };
        {
            let mut cache = VerdictCache::open(&path).unwrap();
            cache.insert("j", "m", "p", "a", v).unwrap();
        }
        let cache = VerdictCache::open(&path).unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("j", "m", "p", "a"), Some(v));
        assert_eq!(cache.get("j2", "m", "p", "a"), None);
        assert_eq!(cache.get("j", "m2", "p", "a"), None);
        assert_eq!(cache.get("j", "m", "pa", ""), None);
        assert_eq!(cache.get("j", "m", "p", "a "), None);
    }
}
