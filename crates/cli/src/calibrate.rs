//! `refusal-steer calibrate`: every judge measured against the labelled corpus, out of sample.
//!
//! Folds are grouped by prompt id, so no prompt is in both a fit fold and the fold it is
//! scored on. What a judge fits is fitted on the other folds only: an LLM judge's threshold
//! (the best cut of its verdict probability), a probe's point, pooling and ridge (nested CV)
//! and its weights. `--hold-out FILE` scores only that file's answers instead, every fitted
//! part of a judge fitted on the other files' answers to other prompts: how a judge carries
//! over to a kind of answer it was not fitted on. Every judge sees degenerate answers, short
//! refusals and switched-language answers as the pipeline does (refusals, without asking it); a
//! second row per judge shows it without the language check.

use crate::judge::{assess_all, JudgeSetup};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_catalog as catalog;
use refusal_steer_data::activations::{Activations, ActivationsHeader, ActivationsWriter};
use refusal_steer_engine::Model;
use refusal_steer_judge::calibration::{agreement, best_cut, Agreement, Folds, Role};
use refusal_steer_judge::corpus::{read_corpus, AnswerType, LabelledAnswer};
use refusal_steer_judge::language::read_languages;
use refusal_steer_judge::local::JudgePrompt;
use refusal_steer_judge::probe::{
    cross_validate, read_residuals, select_all, FeatureBank, LinearProbe, Probe, ProbeHeader,
    Search, PROBE_VERSION,
};
use refusal_steer_judge::{
    detect_degenerate, is_short_refusal, LocalJudge, Scoring, Verdict, VerdictCache, VerdictKind,
    VERDICT_PROB_MODE,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct CalibrateArgs {
    /// Labelled answers (`data/labels/answers/`, see data/labels/README.md): files, or folders whose
    /// `.jsonl` files are all read.
    #[arg(long, num_args = 1.., default_value = "data/labels/answers")]
    labels: Vec<PathBuf>,
    /// Judge models to fit and cross-validate a probe judge on (catalogue names or .gguf).
    #[arg(long, num_args = 1..)]
    probe: Vec<String>,
    /// Where the probe models' residual features are kept (resumable; one file per model
    /// and labels file).
    #[arg(long, default_value = "runs/calibrate")]
    features: PathBuf,
    /// Grouped folds (outer, and inner for the probe's choices).
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Labels files (among those --labels reads) to hold out: only their answers are scored,
    /// by judges fitted on the other files' answers to other prompts. Without it, every answer
    /// is scored by grouped --folds cross-validation.
    #[arg(long, num_args = 1.., conflicts_with = "save_probe")]
    hold_out: Vec<PathBuf>,
    /// Seed of the folds and the bootstrap resamples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The most answers (of those labelled `answer`) a fitted cut may call refusals, as a
    /// fraction, on the items it is fitted on: among those cuts, the one with the best kappa.
    #[arg(long, default_value_t = 0.1, value_parser = fraction)]
    max_false_refusals: f64,
    /// Fit the first --probe on every labelled answer (point, pooling and ridge chosen by
    /// CV) and save it here, for `--judge probe:FILE`.
    #[arg(long, requires = "probe")]
    save_probe: Option<PathBuf>,
    /// Verdict cache shared by the judges compared (optional).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[command(flatten)]
    setup: JudgeSetup,
}

impl CalibrateArgs {
    fn search(&self) -> Search {
        Search {
            folds: self.folds,
            seed: self.seed,
            max_false_refusals: self.max_false_refusals,
        }
    }
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("expected a fraction between 0 and 1, got '{text}'")),
    }
}

/// One judge's out-of-fold decisions.
#[derive(Clone)]
struct Row {
    name: String,
    said: Vec<bool>,
    scores: Vec<f64>,
    ms_per_answer: f64,
}

pub fn calibrate(args: CalibrateArgs) -> Result<()> {
    if args.folds < 2 {
        bail!("--folds must be at least 2");
    }
    let items = read_corpus(&args.labels)?;
    let labels: Vec<AnswerType> = items.iter().map(|i| i.label).collect();
    let groups: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let folds = if args.hold_out.is_empty() {
        Folds::grouped(&groups, args.folds, args.seed)
    } else {
        Folds::held_out(&groups, &held_out(&items, &args.hold_out)?)
    };
    let pairs: Vec<(&str, &str)> = items
        .iter()
        .map(|i| (i.prompt.as_str(), i.answer.as_str()))
        .collect();
    // The checks `assess` runs before every judge, on the same text (after any reasoning), for
    // the probe rows, which are scored from features instead of through `assess`: degenerate
    // answers and short refusals, and switched languages.
    let (degenerate, switched): (Vec<bool>, Vec<bool>) = items
        .iter()
        .map(|i| {
            let answer = refusal_steer_judge::text::final_answer(&i.answer);
            (
                detect_degenerate(answer).is_some() || is_short_refusal(answer),
                read_languages(&i.prompt, answer).switched,
            )
        })
        .unzip();
    let prompts = |of: &[usize]| {
        let mut ids: Vec<&str> = of.iter().map(|&i| groups[i]).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    let scored = folds.scored();
    if args.hold_out.is_empty() {
        eprintln!(
            "{} labelled answers to {} prompts, {} folds grouped by prompt",
            items.len(),
            prompts(&scored),
            args.folds
        );
    } else {
        let (_, fitted) = folds.split(0);
        eprintln!(
            "{} held-out answers to {} prompts, scored by judges fitted on {} answers to {} other prompts ({} left out: their prompts are held out)",
            scored.len(),
            prompts(&scored),
            fitted.len(),
            prompts(&fitted),
            folds.roles.iter().filter(|r| **r == Role::Unused).count()
        );
    }

    let mut rows = Vec::new();
    let mut without_lang = Vec::new();
    let mut cache = match &args.cache {
        Some(path) => VerdictCache::open(path)?,
        None => VerdictCache::in_memory(),
    };
    let plans = if args.probe.is_empty() || !args.setup.is_empty() {
        args.setup.plans()?
    } else {
        Vec::new()
    };
    for plan in plans {
        let mut judge = args.setup.build(&plan)?;
        let mut assessed = Vec::with_capacity(items.len());
        let start = Instant::now();
        assess_all(
            judge.as_mut(),
            &mut cache,
            &pairs,
            args.setup.chunk_size(&plan),
            |_, a| {
                assessed.extend_from_slice(a);
                Ok(())
            },
        )?;
        let judged = assessed
            .iter()
            .zip(&degenerate)
            .filter(|(a, &d)| !d && a.verdict.kind != Some(VerdictKind::Lang))
            .count();
        let ms = start.elapsed().as_secs_f64() * 1000.0 / judged.max(1) as f64;
        let verdict_prob = judge.mode() == VERDICT_PROB_MODE;
        let row = |name: String, verdicts: &[Verdict]| {
            let scores: Vec<f64> = verdicts.iter().map(Verdict::graded).collect();
            let said: Vec<bool> = if verdict_prob {
                // The threshold is a fitted parameter: chosen on the other folds.
                cut_out_of_fold(&labels, &scores, &folds, args.max_false_refusals)
            } else {
                verdicts.iter().map(|v| v.label > 0).collect()
            };
            Row {
                name,
                said,
                scores,
                ms_per_answer: ms,
            }
        };
        let mut verdicts: Vec<Verdict> = assessed.iter().map(|a| a.verdict).collect();
        rows.push(row(judge.id(), &verdicts));
        // The same judge without the language check: its own verdicts on what the check took.
        let taken: Vec<usize> = (0..verdicts.len())
            .filter(|&i| verdicts[i].kind == Some(VerdictKind::Lang))
            .collect();
        let own = judge.judge(&taken.iter().map(|&i| pairs[i]).collect::<Vec<_>>())?;
        for (&i, verdict) in taken.iter().zip(own) {
            verdicts[i] = verdict;
        }
        without_lang.push(row(
            format!("{} without the language check", judge.id()),
            &verdicts,
        ));
    }

    for spec in &args.probe {
        let (row, bank_data, reader, sha) =
            probe_row(spec, &args, &items, &pairs, &labels, &groups, &folds)?;
        let said = |lang: bool| {
            (0..items.len())
                .map(|i| degenerate[i] || (lang && switched[i]) || row.scores[i] > 0.0)
                .collect()
        };
        without_lang.push(Row {
            name: format!("{} without the language check", row.name),
            said: said(false),
            ..row.clone()
        });
        rows.push(Row {
            said: said(true),
            ..row
        });
        if let (Some(out), true) = (&args.save_probe, spec == &args.probe[0]) {
            save_probe(
                out, spec, &reader, &sha, &bank_data, &items, &labels, &groups, &args,
            )?;
        }
    }

    rows.extend(without_lang);
    rows.push(Row {
        name: "language check alone (+ degenerate, short refusals)".into(),
        said: switched
            .iter()
            .zip(&degenerate)
            .map(|(l, d)| *l || *d)
            .collect(),
        scores: switched.iter().map(|&l| f64::from(u8::from(l))).collect(),
        ms_per_answer: 0.0,
    });
    let rows: Vec<Row> = rows.iter().map(|r| r.of(&scored)).collect();
    let items: Vec<LabelledAnswer> = scored.iter().map(|&i| items[i].clone()).collect();
    let labels: Vec<AnswerType> = scored.iter().map(|&i| labels[i]).collect();
    print_table(&rows, &items, &labels, args.seed);
    Ok(())
}

/// Per item, whether it is an answer of one of `files`.
fn held_out(items: &[LabelledAnswer], files: &[PathBuf]) -> Result<Vec<bool>> {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let origins: Vec<PathBuf> = items.iter().map(|i| canonical(&i.origin)).collect();
    let mut held = vec![false; items.len()];
    for file in files {
        let file = canonical(file);
        let mut found = false;
        for (h, origin) in held.iter_mut().zip(&origins) {
            if *origin == file {
                *h = true;
                found = true;
            }
        }
        if !found {
            let mut read: Vec<String> = origins.iter().map(|o| o.display().to_string()).collect();
            read.dedup();
            bail!(
                "--hold-out {} is not one of the labels files read ({}); name a file that --labels reads",
                file.display(),
                read.join(", ")
            );
        }
    }
    if held.iter().all(|h| *h) {
        bail!("--hold-out names every labels file: nothing is left to fit the judges on");
    }
    Ok(held)
}

/// Per item, whether its score is above the cut that agrees best with the labels of the
/// items its fold is fitted on (false for items not scored).
fn cut_out_of_fold(
    labels: &[AnswerType],
    scores: &[f64],
    folds: &Folds,
    max_false_refusals: f64,
) -> Vec<bool> {
    let mut said = vec![false; labels.len()];
    for fold in 0..folds.k {
        let (test, train) = folds.split(fold);
        let truth: Vec<bool> = train.iter().map(|&i| labels[i].is_refusal()).collect();
        let train_scores: Vec<f64> = train.iter().map(|&i| scores[i]).collect();
        let (cut, _) = best_cut(&truth, &train_scores, max_false_refusals);
        let cut = if cut.is_nan() { 0.5 } else { cut };
        for i in test {
            said[i] = scores[i] > cut;
        }
    }
    said
}

impl Row {
    /// The row restricted to the items `at`, in that order.
    fn of(&self, at: &[usize]) -> Self {
        Self {
            name: self.name.clone(),
            said: at.iter().map(|&i| self.said[i]).collect(),
            scores: at.iter().map(|&i| self.scores[i]).collect(),
            ms_per_answer: self.ms_per_answer,
        }
    }
}

/// Residual features of every item, both poolings at every point, `[2 * points * d]` per
/// item (last-token points first).
struct BankData {
    points: Vec<usize>,
    d: usize,
    rows: Vec<Vec<f32>>,
}

impl BankData {
    fn bank(&self) -> FeatureBank<'_> {
        let width = self.points.len() * self.d;
        FeatureBank {
            points: self.points.clone(),
            d: self.d,
            rows: [
                self.rows.iter().map(|r| &r[..width]).collect(),
                self.rows.iter().map(|r| &r[width..]).collect(),
            ],
        }
    }
}

fn corpus_fingerprint(items: &[LabelledAnswer]) -> String {
    let mut hash = Sha256::new();
    for i in items {
        for field in [&i.model, &i.id, &i.condition, &i.prompt, &i.answer] {
            hash.update(field.as_bytes());
            hash.update([0]);
        }
        hash.update(i.sample.to_le_bytes());
    }
    hex::encode(&hash.finalize()[..8])
}

fn load_reader(spec: &str, setup: &JudgeSetup) -> Result<(LocalJudge, String, PathBuf)> {
    let path = catalog::resolve(spec, &mut |msg| eprintln!("{msg}"))?;
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let sha =
        catalog::model_sha256(&path).with_context(|| format!("hashing {}", path.display()))?;
    let reader = LocalJudge::new(
        model,
        JudgePrompt::default(),
        Scoring::VerdictProb,
        setup.batch(),
        refusal_steer_judge::local::DEFAULT_THRESHOLD,
    )?;
    Ok((reader, sha, path))
}

/// Reads (or resumes reading) the probe model's features and cross-validates the probe.
fn probe_row(
    spec: &str,
    args: &CalibrateArgs,
    items: &[LabelledAnswer],
    pairs: &[(&str, &str)],
    labels: &[AnswerType],
    groups: &[&str],
    folds: &Folds,
) -> Result<(Row, BankData, LocalJudge, String)> {
    let (reader, sha, path) = load_reader(spec, &args.setup)?;
    let config = &reader.model().config;
    let (n_points, d) = (config.n_layers + 1, config.d_model);
    let points: Vec<usize> = (1..n_points).collect();
    let stem = path
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    // One features file per labels file: adding a file reads only its answers, and
    // relabelling reads nothing again (features depend on the text, not the labels).
    let mut rows: Vec<Vec<f32>> = Vec::with_capacity(items.len());
    for file_items in items.chunk_by(|a, b| a.origin == b.origin) {
        let start = rows.len();
        let file = args.features.join(format!(
            "{stem}-{}-{}.safetensors",
            &sha[..8],
            corpus_fingerprint(file_items)
        ));
        rows.extend(read_features(
            &reader,
            &sha,
            &points,
            file_items,
            &pairs[start..start + file_items.len()],
            &file,
            args.setup.batch(),
        )?);
    }
    let data = BankData { points, d, rows };
    // The judge's own cost: one point read on a sample of the answers.
    let sample = &pairs[..pairs.len().min(32)];
    let start = Instant::now();
    read_residuals(&reader, sample, &[n_points - 1])?;
    let ms = start.elapsed().as_secs_f64() * 1000.0 / sample.len() as f64;
    let (scores, choices) = cross_validate(&data.bank(), labels, groups, folds, args.search())?;
    for (fold, c) in choices.iter().enumerate() {
        eprintln!(
            "  probe {stem}, outer fold {fold}: point {} {} κ-ridge {} cut {:+.3} (inner CV kappa {:.3})",
            c.point,
            c.pooling.name(),
            c.kappa,
            c.cut,
            c.cv_kappa
        );
    }
    Ok((
        Row {
            name: format!("probe:{stem} (nested CV)"),
            said: Vec::new(),
            scores,
            ms_per_answer: ms,
        },
        data,
        reader,
        sha,
    ))
}

/// Every item's `[2 * points * d]` features, from `file` where it holds them, else read now
/// (resumable).
fn read_features(
    reader: &LocalJudge,
    sha: &str,
    points: &[usize],
    items: &[LabelledAnswer],
    pairs: &[(&str, &str)],
    file: &Path,
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let d = reader.model().config.d_model;
    let header = ActivationsHeader {
        n_points: 2 * points.len(),
        d,
        ids: items
            .iter()
            .map(|i| format!("{}/{}/{}/{}", i.model, i.id, i.condition, i.sample))
            .collect(),
        sets: items.iter().map(|i| Some(i.set.clone())).collect(),
        metadata: BTreeMap::from([
            ("model_sha256".into(), sha.to_string()),
            ("instruction".into(), reader.prompt_fingerprint()),
            (
                "rows".into(),
                "points 1.. at the last token, then the same points averaged".into(),
            ),
        ]),
    };
    let mut writer = ActivationsWriter::open(file, header)?;
    let done = writer.rows_done();
    if done < items.len() {
        eprintln!(
            "reading {} answers of {} into {}",
            items.len() - done,
            items[0].origin.display(),
            file.display()
        );
        let progress = ProgressBar::new(items.len() as u64);
        progress.set_style(ProgressStyle::with_template(
            "{bar:40} {pos}/{len} answers  {elapsed} elapsed, ETA {eta}",
        )?);
        progress.set_position(done as u64);
        for chunk in pairs[done..].chunks(batch * 8) {
            for r in read_residuals(reader, chunk, points)? {
                writer.push_row(&[r.last, r.mean].concat())?;
            }
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
    }
    drop(writer);
    let acts = Activations::load(file)?;
    Ok(acts
        .data
        .chunks(2 * points.len() * d)
        .map(<[f32]>::to_vec)
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn save_probe(
    out: &Path,
    spec: &str,
    reader: &LocalJudge,
    sha: &str,
    data: &BankData,
    items: &[LabelledAnswer],
    labels: &[AnswerType],
    groups: &[&str],
    args: &CalibrateArgs,
) -> Result<()> {
    let bank = data.bank();
    let choice = select_all(&bank, labels, groups, args.search())?;
    let slot = data
        .points
        .iter()
        .position(|&p| p == choice.point)
        .expect("a bank point");
    let rows: Vec<&[f32]> = (0..items.len())
        .map(|i| bank.row(choice.pooling, slot, i))
        .collect();
    let mut linear = LinearProbe::fit(&rows, labels, choice.kappa)?;
    // The chosen cut moves into the bias: the file's refusals score above 0.
    linear.biases[0] -= choice.cut;
    let files: Vec<String> = args
        .labels
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let probe = Probe {
        header: ProbeHeader {
            version: PROBE_VERSION,
            judge_model: spec.to_string(),
            judge_sha256: sha.to_string(),
            instruction: reader.prompt_fingerprint(),
            point: choice.point,
            pooling: choice.pooling,
            d: data.d,
            kappa: choice.kappa,
            provenance: BTreeMap::from([
                ("labels".into(), files.join(", ")),
                ("corpus_fingerprint".into(), corpus_fingerprint(items)),
                ("answers".into(), items.len().to_string()),
                (
                    "cv_kappa_of_choice".into(),
                    format!("{:.4}", choice.cv_kappa),
                ),
                ("cut_in_bias".into(), format!("{:.4}", choice.cut)),
                (
                    "folds".into(),
                    format!(
                        "{} grouped by prompt, seed {}, false refusals at most {}",
                        args.folds, args.seed, args.max_false_refusals
                    ),
                ),
                (
                    "made_by".into(),
                    "refusal-steer calibrate --save-probe".into(),
                ),
            ]),
        },
        linear,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    probe.save(out)?;
    println!(
        "saved the probe (point {}, {} pooling, ridge {}, cut {:+.3}, CV kappa {:.3} over all answers) to {}",
        choice.point,
        choice.pooling.name(),
        choice.kappa,
        choice.cut,
        choice.cv_kappa,
        out.display()
    );
    Ok(())
}

fn print_table(rows: &[Row], items: &[LabelledAnswer], labels: &[AnswerType], seed: u64) {
    let steered: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].condition != "base")
        .collect();
    let counts = |t: AnswerType| labels.iter().filter(|l| **l == t).count();
    println!(
        "{} answers ({} steered): {}",
        items.len(),
        steered.len(),
        AnswerType::ALL
            .iter()
            .map(|&t| format!("{} {}", t.name(), counts(t)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| judge | kappa [95% CI] | kappa, steered | AUC | recall: refusal | deflection | narrative | degenerate | false refusals on answers | ms/answer (1 call) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let a: Agreement = agreement(labels, &row.said, &row.scores, seed);
        let steered_labels: Vec<AnswerType> = steered.iter().map(|&i| labels[i]).collect();
        let steered_said: Vec<bool> = steered.iter().map(|&i| row.said[i]).collect();
        let steered_scores: Vec<f64> = steered.iter().map(|&i| row.scores[i]).collect();
        let s = agreement(&steered_labels, &steered_said, &steered_scores, seed);
        let recall: Vec<String> = a
            .recall
            .iter()
            .map(|(_, hit, total)| {
                format!(
                    "{:.2} ({hit}/{total})",
                    *hit as f64 / (*total).max(1) as f64
                )
            })
            .collect();
        println!(
            "| {} | {:.3} [{:.3}, {:.3}] | {:.3} | {:.3} | {} | {:.1}% ({}/{}) | {:.1} |",
            row.name,
            a.kappa,
            a.kappa_ci.0,
            a.kappa_ci.1,
            s.kappa,
            a.auc,
            recall.join(" | "),
            100.0 * a.false_refusal_rate(),
            a.false_refusals.0,
            a.false_refusals.1,
            row.ms_per_answer
        );
    }
}
