//! The probe judge: a linear read-out of a judge model's residual stream while it reads the
//! judge instruction with the request and the answer. One prefill per answer, no generation.
//!
//! Prompting cannot make the small judge models that run here name deflection or narrative
//! (their verdict probabilities rank read-labelled steered answers at AUC 0.66), but their
//! residual streams can still hold the distinction; a ridge classifier fitted on labelled
//! answers ([`linear`]) reads it out.
//!
//! - Features: the residual vector at one point, averaged over the tokens after the shared
//!   instruction opening ([`Pooling::Mean`]) or taken at the last token, right after the
//!   answer prefix ([`Pooling::Last`]).
//! - File: safetensors with `mean` `[d]`, `weights` `[1 + types, d]`, `biases` and a versioned
//!   JSON header (`probe`) naming the judge model by sha256, the instruction, point, pooling
//!   and how it was made.
//! - Verdict: refusal when the score is positive, its type from the type scores. (An answer
//!   in another language than its question's never reaches the probe: [`crate::assess`]
//!   calls it a refusal first.)
//! - Built in: the probes fitted on `data/labels/answers/` for Qwen2.5-Coder-1.5B (`--judge
//!   probe`, the default judge) and -0.5B ([`Probe::built_in`]).

mod linear;

pub use linear::{cross_validate, select_all, Choice, FeatureBank, LinearProbe, Search, RIDGES};

use crate::corpus::AnswerType;
use crate::local::LocalJudge;
use crate::{Judge, JudgeError, Result, Verdict, VerdictKind};
use refusal_steer_engine::{Action, Intervention, Logits, Positions, Rows};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const PROBE_MODE: &str = "probe";
pub const PROBE_VERSION: u32 = 1;

/// Probes shipped in the binary, by name: each made by `refusal-steer calibrate --save-probe`
/// from `data/labels/answers/` (`crates/judge/data/README.md` says with which command).
const BUILT_IN: &[(&str, &[u8])] = &[
    (
        "qwen2.5-coder-1.5b",
        include_bytes!("../../data/probe-qwen2.5-coder-1.5b.safetensors"),
    ),
    (
        "qwen2.5-coder-0.5b",
        include_bytes!("../../data/probe-qwen2.5-coder-0.5b.safetensors"),
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Last,
    Mean,
}

impl Pooling {
    pub const ALL: [Self; 2] = [Self::Last, Self::Mean];

    pub fn name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::Mean => "mean",
        }
    }
}

/// One answer's residual vectors at the requested points, both poolings, `[points * d]` each.
#[derive(Debug, Clone, Default)]
pub struct Residuals {
    pub last: Vec<f32>,
    pub mean: Vec<f32>,
}

impl Residuals {
    pub fn pooled(&self, pooling: Pooling) -> &[f32] {
        match pooling {
            Pooling::Last => &self.last,
            Pooling::Mean => &self.mean,
        }
    }
}

/// Runs the judge model over each (request, answer)'s judge prompt and pools the residual
/// stream at `points`, in item order.
pub fn read_residuals(
    judge: &LocalJudge,
    items: &[(&str, &str)],
    points: &[usize],
) -> Result<Vec<Residuals>> {
    let model = judge.model();
    let d = model.config.d_model;
    if let Some(&bad) = points.iter().find(|&&p| p > model.config.n_layers) {
        return Err(JudgeError::Setup(format!(
            "point {bad} is beyond the judge model's last point {}",
            model.config.n_layers
        )));
    }
    judge.in_batches(items, |prompts| {
        let mut hooks = model.new_hooks();
        for &point in points {
            hooks.add(Intervention {
                point,
                action: Action::Capture,
                rows: Rows::All,
                positions: Positions::Prompt,
            })?;
        }
        // The pass stops at the last captured point: later blocks and the head read nothing.
        judge.prefill_batch(prompts, 0, &mut hooks, Logits::None)?;
        let width = points.len() * d;
        let mut sums = vec![vec![0f64; width]; prompts.len()];
        let mut counts = vec![vec![0usize; points.len()]; prompts.len()];
        let mut last_at = vec![vec![None::<u32>; points.len()]; prompts.len()];
        let mut out = vec![
            Residuals {
                last: vec![0.0; width],
                mean: vec![0.0; width],
            };
            prompts.len()
        ];
        for c in hooks.take_captured() {
            let slot = points
                .iter()
                .position(|&p| p == c.point)
                .expect("a hooked point");
            let span = slot * d..(slot + 1) * d;
            for (s, v) in sums[c.row][span.clone()].iter_mut().zip(&c.values) {
                *s += f64::from(*v);
            }
            counts[c.row][slot] += 1;
            if last_at[c.row][slot].is_none_or(|at| c.position > at) {
                last_at[c.row][slot] = Some(c.position);
                out[c.row].last[span].copy_from_slice(&c.values);
            }
        }
        for (row, residuals) in out.iter_mut().enumerate() {
            for (i, m) in residuals.mean.iter_mut().enumerate() {
                *m = (sums[row][i] / counts[row][i / d].max(1) as f64) as f32;
            }
        }
        Ok(out)
    })
}

/// Everything a probe file says about how it reads and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeHeader {
    pub version: u32,
    /// The judge model (a catalogue name or file) and its sha256: a probe reads only that
    /// model's stream.
    pub judge_model: String,
    pub judge_sha256: String,
    /// The judge instruction's fingerprint (the prompt the features were read under).
    pub instruction: String,
    pub point: usize,
    pub pooling: Pooling,
    pub d: usize,
    pub kappa: f64,
    /// How it was made: corpus files and their sha256, rows, the cross-validated numbers.
    pub provenance: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub header: ProbeHeader,
    pub linear: LinearProbe,
}

fn bad_file(path: &Path, detail: String) -> JudgeError {
    JudgeError::BadFile {
        path: path.to_path_buf(),
        detail,
    }
}

impl Probe {
    pub fn save(&self, path: &Path) -> Result<()> {
        let bad = |detail: String| bad_file(path, detail);
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mean = f32_bytes(&self.linear.mean);
        let weights: Vec<u8> = self
            .linear
            .weights
            .iter()
            .flat_map(|w| f32_bytes(w))
            .collect();
        let biases: Vec<u8> = self
            .linear
            .biases
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        // Shapes are the data's own, so a header that disagrees is caught on load.
        let d = self.linear.mean.len();
        let rows = self.linear.weights.len();
        let views = [
            ("mean", Dtype::F32, vec![d], &mean),
            ("weights", Dtype::F32, vec![rows, d], &weights),
            (
                "biases",
                Dtype::F64,
                vec![self.linear.biases.len()],
                &biases,
            ),
        ]
        .into_iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(dtype, shape, data)
                .map(|view| (name, view))
                .map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
        let header = serde_json::to_string(&self.header).map_err(|e| bad(e.to_string()))?;
        let metadata = std::collections::HashMap::from([("probe".to_string(), header)]);
        let data = safetensors::serialize(views, Some(metadata)).map_err(|e| bad(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| bad(e.to_string()))
    }

    pub fn built_in_names() -> Vec<&'static str> {
        BUILT_IN.iter().map(|(name, _)| *name).collect()
    }

    /// One of the probes shipped in the binary, by name.
    pub fn built_in(name: &str) -> Result<Self> {
        let (name, bytes) = BUILT_IN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            JudgeError::Setup(format!(
                "unknown built-in probe '{name}'; built in: {}, or give a probe file",
                Self::built_in_names().join(", ")
            ))
        })?;
        Self::from_bytes(bytes, Path::new(name))
    }

    /// Reads a probe file, refusing one that is not whole and consistent.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| bad_file(path, e.to_string()))?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Probe::load`] from bytes already read (`path` names them in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |detail: String| bad_file(path, detail);
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let header_text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("probe"))
            .ok_or_else(|| {
                bad("no 'probe' header: not a probe file (make one with `refusal-steer calibrate --save-probe`)".into())
            })?;
        let header: ProbeHeader = serde_json::from_str(header_text)
            .map_err(|e| bad(format!("the probe header does not read: {e}")))?;
        if header.version != PROBE_VERSION {
            return Err(bad(format!(
                "probe format version {} is not {PROBE_VERSION}, the one this build reads",
                header.version
            )));
        }
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let t = tensors
                .tensor(name)
                .map_err(|_| bad(format!("no '{name}' tensor")))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(bad(format!(
                    "'{name}' is {:?} {:?}, expected {dtype:?} {shape:?} (the header says d = {})",
                    t.dtype(),
                    t.shape(),
                    header.d
                )));
            }
            Ok(t.data().to_vec())
        };
        let rows = 1 + AnswerType::ALL.len();
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let mean = f32s(read("mean", Dtype::F32, &[header.d])?);
        let flat = f32s(read("weights", Dtype::F32, &[rows, header.d])?);
        let biases: Vec<f64> = read("biases", Dtype::F64, &[rows])?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if mean.iter().chain(&flat).any(|x| !x.is_finite()) || biases.iter().any(|b| !b.is_finite())
        {
            return Err(bad("the probe holds NaN or infinite values".into()));
        }
        let weights = flat.chunks(header.d).map(<[f32]>::to_vec).collect();
        Ok(Self {
            header,
            linear: LinearProbe {
                mean,
                weights,
                biases,
            },
        })
    }

    /// The verdict for one answer from its pooled features.
    pub fn verdict(&self, x: &[f32]) -> Verdict {
        let score = self.linear.score(x);
        let kind = (score > 0.0).then(|| kind_of(self.linear.refusal_type(x)));
        Verdict {
            label: if kind.is_some() { 1 } else { -1 },
            p_refusal: Some(linear::p_refusal(score)),
            kind,
        }
    }
}

fn kind_of(t: AnswerType) -> VerdictKind {
    match t {
        AnswerType::Answer | AnswerType::Refusal => VerdictKind::Refusal,
        AnswerType::Deflection => VerdictKind::Deflection,
        AnswerType::Narrative => VerdictKind::Narrative,
        AnswerType::Degenerate => VerdictKind::Degenerate,
    }
}

/// The probe as a [`Judge`]: the judge model reads, the probe decides.
pub struct ProbeJudge {
    reader: LocalJudge,
    probe: Probe,
    name: String,
}

impl ProbeJudge {
    /// Pairs a probe with the judge model it was fitted on (`judge_sha256` is the reader's
    /// model file's: the caller knows it without rehashing a catalogue model). A probe from
    /// another judge model or instruction, or of another width, is refused with the reason.
    pub fn new(reader: LocalJudge, judge_sha256: &str, probe: Probe, name: String) -> Result<Self> {
        let h = &probe.header;
        let config = &reader.model().config;
        if judge_sha256 != h.judge_sha256 {
            return Err(JudgeError::Setup(format!(
                "the probe {name} was fitted on the judge model {} (sha256 {}…), not on {} (sha256 {}…); judge with that model or fit a probe for this one",
                h.judge_model,
                short(&h.judge_sha256),
                reader.model().path.display(),
                short(judge_sha256),
            )));
        }
        if h.d != config.d_model || h.point > config.n_layers {
            return Err(JudgeError::Setup(format!(
                "the probe {name} reads point {} of width {}, but the judge model has points 0..={} of width {}",
                h.point, h.d, config.n_layers, config.d_model
            )));
        }
        if h.instruction != reader.prompt_fingerprint() {
            return Err(JudgeError::Setup(format!(
                "the probe {name} was fitted under judge instruction {}, not {}; judge with the instruction it was fitted under",
                h.instruction,
                reader.prompt_fingerprint()
            )));
        }
        Ok(Self {
            reader,
            probe,
            name,
        })
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

impl Judge for ProbeJudge {
    fn id(&self) -> String {
        format!(
            "probe:{}#{}",
            self.name,
            short(&self.probe.header.judge_sha256)
        )
    }

    fn mode(&self) -> &'static str {
        PROBE_MODE
    }

    fn judge(&mut self, items: &[(&str, &str)]) -> Result<Vec<Verdict>> {
        let h = &self.probe.header;
        let residuals = read_residuals(&self.reader, items, &[h.point])?;
        Ok(residuals
            .iter()
            .map(|r| self.probe.verdict(r.pooled(h.pooling)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(d: usize) -> ProbeHeader {
        ProbeHeader {
            version: PROBE_VERSION,
            judge_model: "judge.gguf".into(),
            judge_sha256: "ab".repeat(32),
            instruction: "00000000".into(),
            point: 3,
            pooling: Pooling::Mean,
            d,
            kappa: 1.0,
            provenance: BTreeMap::from([("corpus".into(), "test".into())]),
        }
    }

    fn probe(d: usize) -> Probe {
        let rows = 1 + AnswerType::ALL.len();
        Probe {
            header: header(d),
            linear: LinearProbe {
                mean: vec![0.0; d],
                weights: (0..rows)
                    .map(|k| {
                        (0..d)
                            .map(|j| if j == 0 || j == k { 1.0 } else { 0.0 })
                            .collect()
                    })
                    .collect(),
                biases: vec![0.0; rows],
            },
        }
    }

    #[test]
    fn built_in_probes_load_and_unknown_names_say_which_exist() {
        for name in Probe::built_in_names() {
            let probe = Probe::built_in(name).unwrap();
            assert!(probe.header.d > 0, "{name}");
        }
        let err = Probe::built_in("nope").unwrap_err().to_string();
        assert!(err.contains("qwen2.5-coder-0.5b"), "{err}");
    }

    #[test]
    fn probe_files_round_trip_and_bad_ones_say_why() {
        let probe = probe(8);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        probe.save(&path).unwrap();
        assert_eq!(Probe::load(&path).unwrap(), probe);

        let mut wrong_d = probe.clone();
        wrong_d.header.d = 4;
        wrong_d.save(&path).unwrap();
        let err = Probe::load(&path).unwrap_err().to_string();
        assert!(err.contains("'mean'") && err.contains("d = 4"), "{err}");

        let mut future = probe.clone();
        future.header.version = 99;
        future.save(&path).unwrap();
        let err = Probe::load(&path).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");

        let mut nan = probe.clone();
        nan.linear.weights[2][5] = f32::NAN;
        nan.save(&path).unwrap();
        assert!(Probe::load(&path).unwrap_err().to_string().contains("NaN"));

        std::fs::write(&path, b"not a probe").unwrap();
        let err = Probe::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a safetensors file"), "{err}");
    }

    #[test]
    fn the_score_decides_and_the_type_rows_name_the_kind() {
        let probe = probe(8);
        let answered = [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let verdict = probe.verdict(&answered);
        assert_eq!((verdict.label, verdict.kind), (-1, None));
        // Score 1 on the refusal row and most on the `narrative` type row (row 1 + 3).
        let x = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let narrative = probe.verdict(&x);
        assert_eq!(
            (narrative.label, narrative.kind),
            (1, Some(VerdictKind::Narrative))
        );
    }
}
