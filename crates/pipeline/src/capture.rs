//! Capturing the residual stream at every point, with the same chat formatting generation
//! uses, into a resumable activations file.

use crate::answers::Format;
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use refusal_steer_data::activations::{ActivationsHeader, ActivationsWriter};
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{
    prefill, Action, Intervention, Logits, Model, Padding, Positions, Rows, SharedPrefix,
};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Which tokens' residual vectors make a prompt's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePosition {
    /// The last token of the formatted prompt (after the assistant header): where the model
    /// decides how to answer. For a reasoning model that is the last token its template
    /// writes: the end of the empty reasoning block with thinking off, the header with it on
    /// (or the reasoning's opening, where the template writes one).
    LastPrompt,
    /// The mean over all prompt tokens.
    MeanPrompt,
    /// The mean over the prompt's own tokens: those after the chat template's opening that
    /// every prompt shares (the user's text and the template's closing).
    MeanUser,
    /// The mean over the tokens of the prompt's first answer, read with the prompt in front.
    MeanAnswer,
}

impl CapturePosition {
    pub fn name(self) -> &'static str {
        match self {
            Self::LastPrompt => "last-prompt",
            Self::MeanPrompt => "mean-prompt",
            Self::MeanUser => "mean-user",
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
    let all_points: Vec<usize> = (0..n_points).collect();
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
    let sha = refusal_steer_catalog::model_sha256(&model.path)
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
    // The chat template's opening is the same for every prompt: run it once. (The means over
    // the prompt and the answer count its positions, so they run prompts whole.)
    let prefix = match position {
        CapturePosition::LastPrompt | CapturePosition::MeanUser => format.shared_prefix(model)?,
        CapturePosition::MeanPrompt | CapturePosition::MeanAnswer => None,
    };
    // Batches are cut from windows of prompts sorted by length, so rows of a batch need
    // little padding; rows are written in the prompts' order at the end of each window.
    for window in prompts[start..].chunks(batch * WINDOW_BATCHES) {
        // Per prompt: the tokens, and the first position that counts toward the mean.
        let mut rows = Vec::with_capacity(window.len());
        for p in window {
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
        let lengths: Vec<usize> = rows.iter().map(|(tokens, _)| tokens.len()).collect();
        let means = by_length(&lengths, batch, |members| {
            let batch_rows: Vec<(&[u32], u32)> = members
                .iter()
                .map(|&i| (rows[i].0.as_slice(), rows[i].1))
                .collect();
            let means = capture_pooled(model, &batch_rows, &all_points, position, prefix.as_ref())?;
            progress.inc(members.len() as u64);
            Ok(means)
        })?;
        for mean in &means {
            writer.push_row(mean)?;
        }
    }
    Ok(())
}

/// Batches per window of length-sorted prompts: enough to find rows of similar length,
/// few enough that a stop loses little.
const WINDOW_BATCHES: usize = 8;

/// `each` run on batches of at most `batch` rows (indices into `lengths`) cut from the rows
/// sorted by length, so that a batch's rows need little padding; its per-row results come
/// back in the rows' order. Batch invariance makes them what any other batching gives.
pub(crate) fn by_length<T>(
    lengths: &[usize],
    batch: usize,
    mut each: impl FnMut(&[usize]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None)
        .take(lengths.len())
        .collect();
    for members in order.chunks(batch.max(1)) {
        let results = each(members)?;
        anyhow::ensure!(
            results.len() == members.len(),
            "{} results for a batch of {}",
            results.len(),
            members.len()
        );
        for (&i, result) in members.iter().zip(results) {
            out[i] = Some(result);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every row is in one batch"))
        .collect())
}

/// One prefill over `rows` (tokens, first position counted), capturing `points`; returns
/// each row's `[points.len() * d]` mean, the points side by side in the order given.
/// `position` decides which tokens are read: the last prompt token, or every prompt token
/// from the row's first counted position (after `prefix`, when there is one).
pub(crate) fn capture_pooled(
    model: &Model,
    rows: &[(&[u32], u32)],
    points: &[usize],
    position: CapturePosition,
    prefix: Option<&SharedPrefix>,
) -> Result<Vec<Vec<f32>>> {
    let d = model.config.d_model;
    let positions = match position {
        CapturePosition::LastPrompt => Positions::LastPrompt,
        CapturePosition::MeanPrompt | CapturePosition::MeanUser | CapturePosition::MeanAnswer => {
            Positions::Prompt
        }
    };
    let mut hooks = model.new_hooks();
    for &point in points {
        hooks.add(Intervention {
            point,
            action: Action::Capture,
            rows: Rows::All,
            positions: positions.clone(),
        })?;
    }
    let tokens: Vec<&[u32]> = rows.iter().map(|(t, _)| *t).collect();
    match prefix {
        Some(prefix) => prefix.prefill(model, &tokens, 0, &mut hooks, Logits::None)?,
        None => prefill(model, &tokens, Padding::Left, 0, &mut hooks, Logits::None)?,
    };
    // Sum what was captured per (row, point); the mean divides by the count.
    let slot_of = |point: usize| points.iter().position(|&p| p == point).expect("captured");
    let mut sums = vec![vec![0f64; points.len() * d]; rows.len()];
    let mut counts = vec![vec![0usize; points.len()]; rows.len()];
    for c in hooks.take_captured() {
        if c.position < rows[c.row].1 {
            continue;
        }
        let slot = slot_of(c.point);
        let sum = &mut sums[c.row][slot * d..(slot + 1) * d];
        for (s, v) in sum.iter_mut().zip(&c.values) {
            *s += *v as f64;
        }
        counts[c.row][slot] += 1;
    }
    Ok(sums
        .iter()
        .zip(&counts)
        .map(|(sum, count)| {
            sum.iter()
                .enumerate()
                .map(|(i, s)| (*s / count[i / d].max(1) as f64) as f32)
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use refusal_steer_data::activations::Activations;
    use refusal_steer_engine::tiny;

    #[test]
    fn rows_stay_in_prompt_order_whatever_the_batching() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let (dir, model) = crate::testing::tiny_model();
        // Lengths out of order, so the length sort moves rows between batches.
        let texts = [
            "the cat sat on the mat in an hour",
            "a",
            "in an hour there",
            "the cat",
            "there sat a cat on a mat",
            "an hour",
            "the",
        ];
        let prompts: Vec<Prompt> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Prompt {
                id: i.to_string(),
                prompt: t.to_string(),
                set: None,
            })
            .collect();
        let format = Format {
            system: None,
            raw: true,
        };
        let run = |batch: usize| {
            let out = dir.path().join(format!("acts-{batch}.safetensors"));
            let job = CaptureJob {
                prompts: &prompts,
                format: &format,
                position: CapturePosition::LastPrompt,
                answers: None,
                batch,
            };
            capture(&model, &job, &out, &ProgressBar::hidden()).unwrap();
            Activations::load(&out).unwrap()
        };
        let (alone, batched) = (run(1), run(3));
        assert_eq!(batched.header.ids, alone.header.ids);
        for (a, b) in alone.data.iter().zip(&batched.data) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // Each row is its own prompt's: the prompts differ, so their last points do.
        let last = alone.at_point(tiny::N_LAYERS);
        let d = tiny::D_MODEL;
        assert_ne!(last[..d], last[d..2 * d]);
    }

    /// With a reasoning template, the last prompt token is the last token the template writes
    /// after the assistant header: its empty reasoning block when thinking is off, the header
    /// itself when on (the model opens its reasoning).
    #[test]
    fn a_thinking_template_is_captured_at_its_own_last_token() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let (dir, mut model) = crate::testing::tiny_model();
        let qwen3_like = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}";
        model.template =
            refusal_steer_tokenizer::ChatTemplate::jinja(qwen3_like, "", "<|im_end|>").unwrap();
        let prompt = |text: &str| Prompt {
            id: "p".into(),
            prompt: text.into(),
            set: None,
        };
        let capture_last = |model: &Model, p: &Prompt, raw: bool, name: &str| {
            let out = dir.path().join(name);
            let job = CaptureJob {
                prompts: std::slice::from_ref(p),
                format: &Format { system: None, raw },
                position: CapturePosition::LastPrompt,
                answers: None,
                batch: 1,
            };
            capture(model, &job, &out, &ProgressBar::hidden()).unwrap();
            Activations::load(&out)
                .unwrap()
                .at_point(tiny::N_LAYERS)
                .to_vec()
        };
        let question = prompt("the cat sat");
        let mut seen = Vec::new();
        for (thinking, ending) in [(false, "</think>\n\n"), (true, "assistant\n")] {
            model.template.set_thinking(Some(thinking)).unwrap();
            let rendered = model.template.prompt(None, "the cat sat").unwrap();
            assert!(rendered.ends_with(ending), "{rendered:?}");
            let chat = capture_last(&model, &question, false, &format!("chat-{thinking}"));
            let raw = capture_last(&model, &prompt(&rendered), true, &format!("raw-{thinking}"));
            assert_eq!(chat, raw, "thinking {thinking}");
            seen.push(chat);
        }
        assert_ne!(seen[0], seen[1]);
    }
}
