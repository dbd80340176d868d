//! The run folder: every path a run reads and writes, atomic writes, the stage timings, and
//! the staleness rule for everything steering produced.
//!
//! Layout (a resumed run reuses each file that is there):
//! `split.json`, `config.toml`, `train-answers.jsonl`, `verdicts.jsonl`, `train-scores.jsonl`,
//! `train-acts.safetensors`, `steering-inputs.json` (the fingerprint below),
//! `vectors/<fitted>.safetensors` + `vectors/gate.json`, `analysis/`,
//! `validation/<condition>/[<strength>/]<set>.jsonl`, `tuning.json`,
//! `test/<condition>/[<strength>/]<set>.jsonl`, `recipes/<method>.steer.safetensors`,
//! `recommended.steer.safetensors`, `report.json`, `report.md`, `*.svg`, `timings.json`.
//!
//! Everything steered follows from the fingerprint of its inputs (train scores, gate, fit and
//! tuning settings): when it changes, [`RunFolder::discard_steering_if_changed`] removes the
//! vectors, analysis, recipes and every steered answer, so old and new never mix. Baseline
//! answers do not depend on it and stay.

use super::methods::Fitted;
use anyhow::{Context, Result};
use refusal_steer_data::lock::OutputLock;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where answers are made: tuning on validation prompts, or the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Validation,
    Test,
}

impl Stage {
    fn folder(self) -> &'static str {
        match self {
            Stage::Validation => "validation",
            Stage::Test => "test",
        }
    }
}

/// A run's folder; see the module docs.
#[derive(Debug)]
pub struct RunFolder {
    root: PathBuf,
    /// Held by the run that writes the folder: a second run on it is refused.
    _lock: Option<OutputLock>,
}

impl RunFolder {
    /// The folder at `root`, created if missing, locked for this process.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            _lock: Some(OutputLock::acquire(root)?),
        })
    }

    /// The folder at `root`, as it is, for reading.
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            _lock: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn vectors(&self, fitted: Fitted) -> PathBuf {
        self.root
            .join("vectors")
            .join(format!("{}.safetensors", fitted.name().replace('+', "-")))
    }

    pub fn gate(&self) -> PathBuf {
        self.root.join("vectors/gate.json")
    }

    pub fn analysis(&self) -> PathBuf {
        self.root.join("analysis")
    }

    /// The answers of `condition` ("baseline" or a method) for one set. A steered
    /// condition's folder is named by its strength, so a resumed run whose tuning chose
    /// another strength answers again instead of reusing answers made at the old one.
    pub fn answers(
        &self,
        stage: Stage,
        condition: &str,
        strength: Option<f64>,
        set: &str,
    ) -> PathBuf {
        let folder = self
            .root
            .join(stage.folder())
            .join(condition.replace('+', "-"));
        match strength {
            Some(s) => folder.join(format!("{s:+.3}/{set}.jsonl")),
            None => folder.join(format!("{set}.jsonl")),
        }
    }

    pub fn recipes(&self) -> PathBuf {
        self.root.join("recipes")
    }

    pub fn recipe(&self, method: &str) -> PathBuf {
        self.recipes()
            .join(format!("{}.steer.safetensors", method.replace('+', "-")))
    }

    /// The recommended method's recipe (a copy of its file in `recipes/`).
    pub fn recommended(&self) -> PathBuf {
        self.root.join("recommended.steer.safetensors")
    }

    /// Writes `text` to the folder's file `name` through a temporary file.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        write_atomic(&self.file(name), text)
    }

    /// Removes everything steering produced when `inputs` differ from those it was made with
    /// (see the module docs); says so through `log`. Records `inputs` either way.
    pub fn discard_steering_if_changed(
        &self,
        inputs: &str,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let path = self.file("steering-inputs.json");
        if std::fs::read_to_string(&path).is_ok_and(|old| old != inputs) {
            log("the train scores or fit/tune settings changed: refitting and re-tuning");
            let mut stale = vec![
                self.root.join("vectors"),
                self.analysis(),
                self.recipes(),
                self.recommended(),
            ];
            for stage in [Stage::Validation, Stage::Test] {
                if let Ok(entries) = std::fs::read_dir(self.root.join(stage.folder())) {
                    stale.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_name() != "baseline")
                            .map(|e| e.path()),
                    );
                }
            }
            for path in stale.iter().filter(|p| p.exists()) {
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_file(path)
                };
                removed.with_context(|| format!("removing stale {}", path.display()))?;
            }
        }
        write_atomic(&path, inputs)
    }

    /// The stage timings of this folder, summed over every invocation.
    pub fn timings(&self) -> Timings {
        let path = self.file("timings.json");
        let totals = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Timings {
            path,
            totals,
            clock: Instant::now(),
        }
    }
}

/// Seconds per stage summed over every invocation of a run folder, so a resumed run reports
/// what the whole run cost.
pub struct Timings {
    path: PathBuf,
    pub totals: BTreeMap<String, f64>,
    clock: Instant,
}

impl Timings {
    /// Adds the time since the last lap to `stage` and saves the totals.
    pub fn lap(&mut self, stage: &str) -> Result<()> {
        *self.totals.entry(stage.to_string()).or_default() += self.clock.elapsed().as_secs_f64();
        self.clock = Instant::now();
        write_atomic(&self.path, &serde_json::to_string_pretty(&self.totals)?)
    }
}

/// Writes through a temporary file, so a kill never leaves half a file behind.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
