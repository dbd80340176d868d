//! Stages 1-3: the train prompts answered unsteered, judged into one confidence per prompt,
//! and their activations captured.

use super::{bar, Ctx};
use crate::capture::{capture, CaptureJob, CapturePosition};
use crate::evaluate::Judges;
use crate::generator::Generator;
use anyhow::Result;
use refusal_steer_data::activations::Activations;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_judge::{aggregate, Thresholds};
use std::collections::HashMap;

/// Stage 1: `samples` answers per train prompt at the run's temperature.
pub fn answer(ctx: &Ctx, train: &[Prompt]) -> Result<Vec<Answer>> {
    let generator = Generator {
        format: ctx.format.clone(),
        options: ctx.options(ctx.config.temperature),
        batch: ctx.config.batch,
        seed: ctx.config.seed,
        ..Generator::new(ctx.model)
    };
    let progress = bar(0, "answers");
    let all = generator.answer_to_file(
        train,
        ctx.config.samples,
        &ctx.folder.file("train-answers.jsonl"),
        &progress,
    )?;
    progress.finish_and_clear();
    Ok(all)
}

/// The judged confidence of refusal per train prompt.
pub struct Scores {
    pub confidence: HashMap<String, f64>,
    /// `{"id", "set", "c"}` per train prompt, in order: what train-scores.jsonl holds and
    /// what the steering fingerprint includes.
    pub records: Vec<serde_json::Value>,
}

/// Stage 2: every answer judged, one confidence per prompt (METHOD §1's aggregation).
pub fn judge(
    ctx: &Ctx,
    train: &[Prompt],
    answers: &[Answer],
    judges: &mut Judges,
) -> Result<Scores> {
    let assessed = judges.assess(answers)?;
    let mut per_prompt: HashMap<&str, Vec<(i8, f64)>> = HashMap::new();
    for (a, (judged, _)) in answers.iter().zip(&assessed) {
        per_prompt
            .entry(a.id.as_str())
            .or_default()
            .push((judged.verdict.label, f64::from(a.mean_logprob)));
    }
    let mut confidence = HashMap::new();
    for (id, answers) in per_prompt {
        confidence.insert(
            id.to_string(),
            aggregate(&answers, &Thresholds::default())?.c,
        );
    }
    let records: Vec<serde_json::Value> = train
        .iter()
        .map(|p| serde_json::json!({"id": p.id, "set": p.set, "c": confidence[&p.id]}))
        .collect();
    ctx.folder.write(
        "train-scores.jsonl",
        &records
            .iter()
            .map(|s| s.to_string() + "\n")
            .collect::<String>(),
    )?;
    Ok(Scores {
        confidence,
        records,
    })
}

/// Stage 3: the residual stream of every train prompt at `position` (the vectors' last
/// prompt token, or what the topic gate reads), in `file` of the run folder.
pub fn capture_activations(
    ctx: &Ctx,
    train: &[Prompt],
    position: CapturePosition,
    file: &str,
) -> Result<Activations> {
    let path = ctx.folder.file(file);
    let progress = bar(train.len() as u64, "prompts");
    let job = CaptureJob {
        prompts: train,
        format: &ctx.format,
        position,
        answers: None,
        batch: ctx.config.batch,
    };
    capture(ctx.model, &job, &path, &progress)?;
    progress.finish_and_clear();
    Ok(Activations::load(&path)?)
}
