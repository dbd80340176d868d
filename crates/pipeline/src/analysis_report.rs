//! The analysis as files: `analysis.json` (everything), `analysis.md` (a per-point table and a
//! summary naming the best points) and SVG charts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use refusal_steer_plot::{self as plot, Chart, Series};

use refusal_steer_steer::analysis::{
    Analysis, AtRank, ComparePoint, PointAnalysis, BEST_POINT_MARGIN,
};

/// Writes the report into `dir` (created if needed) and returns the files written.
pub fn write_report(analysis: &Analysis, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: String| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    let json = serde_json::to_string_pretty(analysis).expect("the analysis serialises");
    write("analysis.json", json + "\n")?;
    write("analysis.md", markdown(analysis))?;
    written.extend(plots(analysis, dir)?);
    Ok(written)
}

/// Charts with something to show: a series whose values are all missing is left out, and a
/// chart with no series left is not drawn.
fn plots(analysis: &Analysis, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut chart = |name: &str, chart: Chart, series: Vec<Series>| -> Result<()> {
        let series: Vec<Series> = series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        if !series.is_empty() {
            let path = dir.join(name);
            plot::lines(&path, &chart, &series)?;
            written.push(path);
        }
        Ok(())
    };
    let points = &analysis.points;
    let per_point = |name: String, value: &dyn Fn(&PointAnalysis) -> Option<f64>| Series {
        name,
        points: points
            .iter()
            .filter_map(|p| Some((p.point as f64, value(p)?)))
            .collect(),
    };
    let method = &analysis.method;
    let compare = analysis.compare_method.as_deref().unwrap_or("");
    let compared = |value: fn(&ComparePoint) -> Option<f64>| {
        move |p: &PointAnalysis| p.compare.as_ref().and_then(value)
    };

    chart(
        "auc_by_point.svg",
        Chart::new(
            format!("Held-out AUC by point ({}-fold)", analysis.folds),
            "point (0 = embeddings, p = output of block p-1)",
            "AUC, refusal vs compliance",
        ),
        vec![
            per_point(format!("{method} held-out"), &|p| p.heldout_auc),
            per_point(
                format!("comparison ({compare}) held-out"),
                &compared(|c| c.heldout_auc),
            ),
            per_point(
                format!("comparison ({compare}) file vector"),
                &compared(|c| c.file_auc),
            ),
        ],
    )?;
    chart(
        "norm_by_point.svg",
        Chart::new("Vector norm by point", "point", "Euclidean norm"),
        vec![
            per_point(method.clone(), &|p| Some(p.norm)),
            per_point(format!("comparison ({compare})"), &|p| {
                p.compare.as_ref().map(|c| c.norm)
            }),
        ],
    )?;
    chart(
        "cosine_adjacent.svg",
        Chart::new(
            "Cosine between adjacent points' vectors",
            "point p (cosine of p with p-1)",
            "cosine",
        ),
        vec![per_point(method.clone(), &|p| p.cosine_to_previous)],
    )?;
    if analysis.compare_method.is_some() {
        chart(
            "compare_by_point.svg",
            Chart::new(
                format!("{method} against the comparison vectors ({compare})"),
                "point",
                "cosine / fraction",
            ),
            vec![
                per_point("cosine".into(), &compared(|c| c.cosine)),
                per_point(
                    "norm fraction surviving projection".into(),
                    &compared(|c| c.surviving_norm_fraction),
                ),
            ],
        )?;
    }
    if let Some(best) = analysis.best_points.first() {
        if let Some(dims) = &points[*best].dimensionality {
            let curve = |name: &str, values: &[AtRank]| Series {
                name: name.into(),
                points: values
                    .iter()
                    .map(|r| ((r.k as f64).log2(), r.value))
                    .collect(),
            };
            chart(
                &format!("dimensionality_point_{best}.svg"),
                Chart::new(
                    format!("How many dimensions carry the signal at point {best}"),
                    "log2 k",
                    "fraction / held-out AUC",
                ),
                vec![
                    curve(
                        "share of |mean diff|^2 in top-k PCs",
                        &dims.mean_difference_in_top_pcs,
                    ),
                    curve("probe AUC, v on top-k PCs", &dims.probe_auc_top_pcs),
                    curve(
                        "probe AUC, top-k coordinates of v",
                        &dims.probe_auc_top_coordinates,
                    ),
                ],
            )?;
        }
    }
    Ok(written)
}

fn number(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.decimals$}"))
}

fn markdown(a: &Analysis) -> String {
    let mut md = String::new();
    let model = a.model.as_deref().unwrap_or("unknown model");
    let _ = writeln!(md, "# Steering-vector analysis: {}\n", a.method);
    let _ = writeln!(
        md,
        "{model}, {} points of width {}. {} refusal, {} compliance, {} neutral (|c| <= {}), \
         {} unscored prompts. Held-out numbers: {}-fold, seed {}, refit with the file's \
         method on the training folds.\n",
        a.n_points,
        a.d,
        a.n_refusal,
        a.n_compliance,
        a.n_neutral,
        a.threshold,
        a.n_unscored,
        a.folds,
        a.seed
    );
    let _ = writeln!(md, "## Summary\n\n{}\n", summary(a));
    let _ = writeln!(md, "## Per point\n");
    let compare = a.compare_method.is_some();
    let mut header =
        "| point | held-out AUC | held-out r | file AUC | norm | cos(prev) | PR | PCs for 90% |"
            .to_string();
    let mut rule = "|---:|---:|---:|---:|---:|---:|---:|---:|".to_string();
    if compare {
        header.push_str(" cos(compare) | surviving | compare held-out AUC | compare file AUC |");
        rule.push_str("---:|---:|---:|---:|");
    }
    header.push_str(" notes |");
    rule.push_str("---|");
    let _ = writeln!(md, "{header}\n{rule}");
    for p in &a.points {
        let mut row = format!(
            "| {} | {} | {} | {} | {:.4} | {} | {} | {} |",
            p.point,
            number(p.heldout_auc, 3),
            number(p.heldout_pearson, 3),
            number(p.file_auc, 3),
            p.norm,
            number(p.cosine_to_previous, 3),
            number(p.participation_ratio, 1),
            p.dimensionality
                .as_ref()
                .map_or("–".into(), |d| d.pcs_for_90_percent.to_string()),
        );
        if compare {
            let c = p.compare.as_ref();
            let _ = write!(
                row,
                " {} | {} | {} | {} |",
                number(c.and_then(|c| c.cosine), 3),
                number(c.and_then(|c| c.surviving_norm_fraction), 3),
                number(c.and_then(|c| c.heldout_auc), 3),
                number(c.and_then(|c| c.file_auc), 3),
            );
        }
        let _ = writeln!(row, " {} |", p.notes.join("; ").replace('|', "/"));
        md.push_str(&row);
    }
    md
}

/// One paragraph: the best points, how separability grows with depth, how many dimensions
/// carry the signal at the best point, and the overlap with the comparison vectors.
fn summary(a: &Analysis) -> String {
    let Some(&best) = a.best_points.first() else {
        return "No point could be scored on held-out folds; the notes column says why.".into();
    };
    let p = &a.points[best];
    let mut text = format!(
        "Held-out AUC is highest at point {best} (the output of block {}): AUC {}, Pearson r {}. \
         Points within {BEST_POINT_MARGIN} of it: {:?}.",
        best - 1,
        number(p.heldout_auc, 3),
        number(p.heldout_pearson, 3),
        a.best_points,
    );
    // Thirds of the blocks (point 0, the embeddings, left out).
    let blocks = a.n_points - 1;
    if blocks >= 3 {
        let third = |i: usize| (1 + i * blocks / 3, (i + 1) * blocks / 3);
        let parts: Vec<String> = (0..3)
            .map(|i| {
                let (from, to) = third(i);
                let aucs: Vec<f64> = a.points[from..=to]
                    .iter()
                    .filter_map(|p| p.heldout_auc)
                    .collect();
                let mean = (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64);
                format!("{} over points {from}-{to}", number(mean, 3))
            })
            .collect();
        let _ = write!(
            text,
            " Mean held-out AUC by depth: {} (early, middle, late blocks).",
            parts.join(", ")
        );
    }
    if let Some(dims) = &p.dimensionality {
        let share = |k: usize| {
            dims.mean_difference_in_top_pcs
                .iter()
                .find(|r| r.k == k)
                .map(|r| format!("{:.0}%", 100.0 * r.value))
        };
        let shares: Vec<String> = [1, 4, 16]
            .iter()
            .filter_map(|&k| Some(format!("top {k}: {}", share(k)?)))
            .collect();
        let _ = write!(
            text,
            " At point {best}, the principal components of the pooled activations hold the \
             class-mean difference as {} ({} components for 90%), and the vector's \
             participation ratio is {} of d = {}.",
            shares.join(", "),
            dims.pcs_for_90_percent,
            number(p.participation_ratio, 0),
            a.d
        );
        if let Some(full) = p.heldout_auc {
            let enough = dims
                .probe_auc_top_coordinates
                .iter()
                .find(|r| r.value >= full - BEST_POINT_MARGIN);
            if let Some(r) = enough {
                let _ = write!(
                    text,
                    " Keeping only its {} largest coordinates already gives held-out AUC {:.3}.",
                    r.k, r.value
                );
            }
        }
    }
    if let (Some(method), Some(c)) = (&a.compare_method, &p.compare) {
        let cosines: Vec<f64> = a.points[1..]
            .iter()
            .filter_map(|p| p.compare.as_ref()?.cosine)
            .collect();
        let mean =
            (!cosines.is_empty()).then(|| cosines.iter().sum::<f64>() / cosines.len() as f64);
        let _ = write!(
            text,
            " Against the comparison vectors ({method}): cosine {} at point {best} (mean {} over \
             points 1-{}), and {} of the vector's norm survives projecting the comparison \
             direction out there.",
            number(c.cosine, 3),
            number(mean, 3),
            a.n_points - 1,
            c.surviving_norm_fraction
                .map_or("–".into(), |f| format!("{:.0}%", 100.0 * f)),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use refusal_steer_data::activations::{Activations, ActivationsHeader};
    use refusal_steer_steer::analysis::{analyze, AnalysisOptions};
    use refusal_steer_steer::SteeringVectors;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn report_files_name_the_best_point_and_plot_it() {
        // Four points: the embeddings (all rows equal), then three noisy copies of a planted
        // direction with growing separation.
        let (d, n) = (12, 40);
        let rows = 2 * n;
        // The first n rows sit +1.5 along the first axis, the others -1.5, in uniform noise.
        let mut rng = StdRng::seed_from_u64(41);
        let mut direction = vec![0.0f32; d];
        direction[0] = 1.0;
        let mut values = Vec::new();
        for i in 0..rows {
            let offset = if i < n { 1.5f32 } else { -1.5 };
            let x: Vec<f32> = (0..d)
                .map(|j| rng.gen_range(-1.0..1.0) + if j == 0 { offset } else { 0.0 })
                .collect();
            values.extend(std::iter::repeat_n(1.0f32, d));
            for scale in [0.2f32, 0.6, 1.0] {
                values.extend(x.iter().map(|v| v * scale));
            }
        }
        let ids: Vec<String> = (0..rows).map(|i| i.to_string()).collect();
        let scores: HashMap<String, f64> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), if i < n { 1.0 } else { -1.0 }))
            .collect();
        let acts = Activations {
            header: ActivationsHeader {
                n_points: 4,
                d,
                ids,
                sets: vec![None; rows],
                metadata: BTreeMap::from([("model".to_string(), "synthetic".to_string())]),
            },
            data: values,
        };
        let vectors = SteeringVectors::new(
            [
                vec![0.0; d],
                direction.clone(),
                direction.clone(),
                direction,
            ]
            .concat(),
            4,
            d,
            BTreeMap::new(),
        )
        .unwrap()
        .with_fit(refusal_steer_steer::FitMetadata {
            method: refusal_steer_steer::Method::Rmd,
            ridge: refusal_steer_steer::Ridge::Relative(1.0),
            n_refusal: n,
            n_compliance: n,
            balance: None,
            points: vec![
                refusal_steer_steer::PointFit {
                    norm: 1.0,
                    residual_norm: 1.0,
                    lambda: None,
                    heldout_auc: None,
                    protected: None,
                };
                4
            ],
        })
        .unwrap();
        let analysis = analyze(
            &acts,
            &scores,
            &vectors,
            Some(&vectors),
            &AnalysisOptions::default(),
        )
        .unwrap();
        // RMD at the embeddings: no spread, so nothing held out there, with a note saying why.
        assert_eq!(analysis.points[0].heldout_auc, None);
        assert!(!analysis.points[0].notes.is_empty());

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report");
        let written = write_report(&analysis, &out).unwrap();
        let best = analysis.best_points[0];
        for name in [
            "analysis.json".to_string(),
            "analysis.md".into(),
            "auc_by_point.svg".into(),
            "norm_by_point.svg".into(),
            "cosine_adjacent.svg".into(),
            "compare_by_point.svg".into(),
            format!("dimensionality_point_{best}.svg"),
        ] {
            assert!(written.contains(&out.join(&name)), "{name} not written");
        }
        let json: Analysis =
            serde_json::from_str(&std::fs::read_to_string(out.join("analysis.json")).unwrap())
                .unwrap();
        // serde_json may round the last bit of a float on the way back, so compare loosely.
        assert_eq!(json.best_points, analysis.best_points);
        assert_eq!(json.points.len(), 4);
        assert!((json.points[2].norm - analysis.points[2].norm).abs() < 1e-12);
        let md = std::fs::read_to_string(out.join("analysis.md")).unwrap();
        assert!(md.contains(&format!("highest at point {best}")), "{md}");
        assert!(md.contains("| cos(compare) |"));
        assert_eq!(
            md.matches("\n| ").count(),
            1 + 4,
            "header and 4 rows:\n{md}"
        );
    }
}
