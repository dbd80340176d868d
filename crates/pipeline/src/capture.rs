//! Capturing the residual stream at every point, with the same chat formatting generation
//! uses, into a resumable activations file.

use crate::answers::Format;
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use refusal_steer_data::activations::{ActivationsHeader, ActivationsWriter};
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{prefill, Action, Intervention, Model, Padding, Positions, Rows};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Which tokens' residual vectors make a prompt's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePosition {
    /// The last token of the formatted prompt (after the assistant header): where the model
    /// decides how to answer.
    LastPrompt,
    /// The mean over all prompt tokens.
    MeanPrompt,
    /// The mean over the tokens of the prompt's first answer, read with the prompt in front.
    MeanAnswer,
}

impl CapturePosition {
    pub fn name(self) -> &'static str {
        match self {
            Self::LastPrompt => "last-prompt",
            Self::MeanPrompt => "mean-prompt",
            Self::MeanAnswer => "mean-answer",
        }
    }
}

/// What to capture and how.
pub struct CaptureJob<'a> {
    pub prompts: &'a [Prompt],
    pub format: &'a Format,
    pub position: CapturePosition,
    /// Answers (first sample per id), needed by [`CapturePosition::MeanAnswer`].
    pub answers: Option<&'a [Answer]>,
    pub batch: usize,
}

/// Writes one `[points, d]` row per prompt to `out`, resuming after the rows it already holds.
pub fn capture(model: &Model, job: &CaptureJob, out: &Path, progress: &ProgressBar) -> Result<()> {
    let CaptureJob {
        prompts,
        format,
        position,
        answers,
        batch,
    } = *job;
    if batch == 0 {
        bail!("the capture batch must be at least 1");
    }
    let (n_points, d) = (model.config.n_layers + 1, model.config.d_model);
    let answer_of: HashMap<&str, &str> = match (position, answers) {
        (CapturePosition::MeanAnswer, None) => {
            bail!("capturing at mean-answer needs the answers file (--answers)")
        }
        (_, Some(answers)) => answers
            .iter()
            .filter(|a| a.sample == 0)
            .map(|a| (a.id.as_str(), a.answer.as_str()))
            .collect(),
        (_, None) => HashMap::new(),
    };
    let sha = refusal_steer_catalog::sha256_file(&model.path)
        .with_context(|| format!("hashing {}", model.path.display()))?;
    let header = ActivationsHeader {
        n_points,
        d,
        ids: prompts.iter().map(|p| p.id.clone()).collect(),
        sets: prompts.iter().map(|p| p.set.clone()).collect(),
        metadata: BTreeMap::from([
            ("model".into(), model.path.display().to_string()),
            ("model_sha256".into(), sha),
            ("position".into(), position.name().into()),
            ("format".into(), format.describe()),
            (
                "points".into(),
                "0 = embeddings, p = output of block p-1".into(),
            ),
        ]),
    };
    let mut writer = ActivationsWriter::open(out, header)?;
    let start = writer.rows_done();
    progress.set_length(prompts.len() as u64);
    progress.set_position(start as u64);
    for batch in prompts[start..].chunks(batch) {
        // Per row: the tokens, and the first position that counts toward the mean.
        let mut rows = Vec::with_capacity(batch.len());
        for p in batch {
            let prompt = format.encode(model, &p.prompt)?;
            if position == CapturePosition::MeanAnswer {
                let Some(answer) = answer_of.get(p.id.as_str()) else {
                    bail!("no answer for prompt {} in the answers file", p.id)
                };
                let answer = model.tokenizer.encode(answer, false, false);
                if answer.is_empty() {
                    bail!("the answer to prompt {} is empty: nothing to average", p.id)
                }
                let from = prompt.len() as u32;
                rows.push(([prompt, answer].concat(), from));
            } else {
                rows.push((prompt, 0));
            }
        }
        let positions = match position {
            CapturePosition::LastPrompt => Positions::LastPrompt,
            CapturePosition::MeanPrompt | CapturePosition::MeanAnswer => Positions::Prompt,
        };
        let mut hooks = model.new_hooks();
        for point in 0..n_points {
            hooks.add(Intervention {
                point,
                action: Action::Capture,
                rows: Rows::All,
                positions: positions.clone(),
            })?;
        }
        let refs: Vec<&[u32]> = rows.iter().map(|(t, _)| t.as_slice()).collect();
        prefill(model, &refs, Padding::Left, 0, &mut hooks)?;
        // Sum what was captured per (row, point); the mean divides by the count.
        let mut sums = vec![vec![0f64; n_points * d]; batch.len()];
        let mut counts = vec![vec![0usize; n_points]; batch.len()];
        for c in hooks.take_captured() {
            if c.position < rows[c.row].1 {
                continue;
            }
            let sum = &mut sums[c.row][c.point * d..(c.point + 1) * d];
            for (s, v) in sum.iter_mut().zip(&c.values) {
                *s += *v as f64;
            }
            counts[c.row][c.point] += 1;
        }
        for (row, sum) in sums.iter().enumerate() {
            let mean: Vec<f32> = sum
                .iter()
                .enumerate()
                .map(|(i, s)| (*s / counts[row][i / d].max(1) as f64) as f32)
                .collect();
            writer.push_row(&mean)?;
            progress.inc(1);
        }
    }
    Ok(())
}
