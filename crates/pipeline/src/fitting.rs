//! One steering vector per point from captured activations and refusal confidences, with each
//! point's held-out separability, the residual scale that norm-scaled strengths need, and
//! optionally a protected direction removed.

use anyhow::{Context, Result};
use refusal_steer_data::activations::Activations;
use refusal_steer_data::Prompt;
use refusal_steer_judge::language::main_script;
use refusal_steer_steer::linalg::{cosine, norm};
use refusal_steer_steer::protect::{principal_directions, project_out_span};
use refusal_steer_steer::{
    fit, k_fold_auc, Balance, Class, FitError, FitMetadata, Method, PointFit, Protection, Ridge,
    Samples, SteeringVectors,
};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
pub struct FitOptions {
    pub method: Method,
    pub ridge: Ridge,
    /// |c| at or below this is neither class.
    pub threshold: f64,
    /// Folds of the held-out AUC per point.
    pub folds: usize,
    pub seed: u64,
    /// Balance the classes over these strata (e.g. the prompts' languages); `None`: as they are.
    pub balance: Option<Strata>,
}

/// A stratum per activation row, for fits balanced over them ([`Samples::with_strata`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Strata {
    /// What a stratum is, for the fit metadata ("prompt script").
    pub by: String,
    pub names: Vec<String>,
    /// Per row, an index into `names`.
    pub of_row: Vec<usize>,
}

impl Strata {
    /// Groups rows by a label each: strata are named by the label, in first-seen order.
    pub fn from_labels(by: &str, labels: &[String]) -> Self {
        let mut names: Vec<String> = Vec::new();
        let of_row = labels
            .iter()
            .map(|label| match names.iter().position(|n| n == label) {
                Some(i) => i,
                None => {
                    names.push(label.clone());
                    names.len() - 1
                }
            })
            .collect();
        Self {
            by: by.to_string(),
            names,
            of_row,
        }
    }

    /// Each row's prompt by its main script ("Latin", "Mandarin"): the strata that keep a fit
    /// whose refused prompts are mostly English and answered ones mostly Chinese from
    /// learning "answer in Chinese" as "comply".
    pub fn prompt_scripts(ids: &[String], prompts: &[Prompt]) -> Result<Self> {
        let text: HashMap<&str, &str> = prompts
            .iter()
            .map(|p| (p.id.as_str(), p.prompt.as_str()))
            .collect();
        let mut labels = Vec::with_capacity(ids.len());
        for id in ids {
            let prompt = text.get(id.as_str()).with_context(|| {
                format!("activation row {id} has no prompt: give the prompts it was captured from")
            })?;
            labels.push(main_script(prompt).map_or("none".to_string(), |s| s.name().to_string()));
        }
        Ok(Self::from_labels("prompt script", &labels))
    }

    /// Per stratum name, the rows of each class (refusal, compliance).
    fn rows(&self, classes: &[Class]) -> BTreeMap<String, [usize; 2]> {
        let mut rows: BTreeMap<String, [usize; 2]> = BTreeMap::new();
        for (&stratum, class) in self.of_row.iter().zip(classes) {
            let slot = match class {
                Class::Refusal => 0,
                Class::Compliance => 1,
                Class::Unused => continue,
            };
            rows.entry(self.names[stratum].clone()).or_default()[slot] += 1;
        }
        rows
    }
}

/// Per row of the activations file: its refusal confidence c, or None to leave it out.
pub type Confidences = Vec<Option<f64>>;

/// The class of each row from its confidence.
pub fn classes(c: &[Option<f64>], threshold: f64) -> Vec<Class> {
    c.iter()
        .map(|c| match *c {
            Some(c) if c > threshold => Class::Refusal,
            Some(c) if c < -threshold => Class::Compliance,
            _ => Class::Unused,
        })
        .collect()
}

/// Per point, the mean of rows `a` minus the mean of rows `b`: `[n_points * d]`. The
/// direction of a behaviour to protect (e.g. harmful prompts minus harmless ones).
pub fn mean_difference(acts: &Activations, a: &[usize], b: &[usize]) -> Result<Vec<f32>> {
    anyhow::ensure!(
        !a.is_empty() && !b.is_empty(),
        "a protected direction needs prompts on both sides ({} and {} found)",
        a.len(),
        b.len()
    );
    let (p, d) = (acts.header.n_points, acts.header.d);
    let row = |i: usize| &acts.data[i * p * d..(i + 1) * p * d];
    let mean = |rows: &[usize]| {
        let mut m = vec![0f64; p * d];
        for &i in rows {
            m.iter_mut()
                .zip(row(i))
                .for_each(|(m, &x)| *m += f64::from(x));
        }
        m.iter_mut().for_each(|m| *m /= rows.len() as f64);
        m
    };
    let (ma, mb) = (mean(a), mean(b));
    Ok(ma.iter().zip(&mb).map(|(x, y)| (x - y) as f32).collect())
}

/// Per point, the top `k` principal directions of rows `a` measured from the mean of rows `b`
/// ([`principal_directions`]): `k` directions, each `[n_points * d]` like [`mean_difference`];
/// a point with fewer directions gets zeros there, which protect nothing.
pub fn principal_directions_per_point(
    acts: &Activations,
    a: &[usize],
    b: &[usize],
    k: usize,
) -> Result<Vec<Vec<f32>>> {
    anyhow::ensure!(
        !a.is_empty() && !b.is_empty(),
        "protected principal directions need prompts on both sides ({} and {} found)",
        a.len(),
        b.len()
    );
    let (p, d) = (acts.header.n_points, acts.header.d);
    let mut out = vec![vec![0f32; p * d]; k];
    for point in 0..p {
        let found = principal_directions(&acts.at_point(point), d, a, b, k)
            .map_err(|e| anyhow::anyhow!("point {point}: {e}"))?;
        for (o, direction) in out.iter_mut().zip(found) {
            o[point * d..(point + 1) * d].copy_from_slice(&direction);
        }
    }
    Ok(out)
}

/// Fits every point. The span of the `protect` directions (each `[n_points * d]`, e.g. from
/// [`mean_difference`]) is removed from each point's vector; the fit metadata records the
/// cosine with the first protected direction and how much of the vector survived.
pub fn fit_points(
    acts: &Activations,
    c: &[Option<f64>],
    options: &FitOptions,
    protect: &[&[f32]],
    log: &mut dyn FnMut(String),
) -> Result<SteeringVectors> {
    let h = &acts.header;
    anyhow::ensure!(
        c.len() == h.ids.len(),
        "{} confidences for {} activation rows",
        c.len(),
        h.ids.len()
    );
    let classes = classes(c, options.threshold);
    let weights: Vec<f64> = c.iter().map(|c| c.map_or(0.0, f64::abs)).collect();
    if let Some(strata) = &options.balance {
        anyhow::ensure!(
            strata.of_row.len() == h.ids.len(),
            "{} strata for {} activation rows",
            strata.of_row.len(),
            h.ids.len()
        );
    }
    let count = |k: Class| classes.iter().filter(|&&c| c == k).count();
    let used: Vec<usize> = (0..classes.len())
        .filter(|&i| classes[i] != Class::Unused)
        .collect();
    let mut vectors = vec![0f32; h.n_points * h.d];
    let mut points = Vec::with_capacity(h.n_points);
    for point in 0..h.n_points {
        let x = acts.at_point(point);
        let d = h.d;
        // The typical size of the residual stream here: what a norm-scaled strength is relative to.
        let scale = used
            .iter()
            .map(|&i| norm(&x[i * d..(i + 1) * d]))
            .sum::<f64>()
            / used.len().max(1) as f64;
        let mut samples = Samples::new(&x, d, &classes, &weights)?;
        if let Some(strata) = &options.balance {
            samples = samples.with_strata(&strata.of_row)?;
        }
        let fitted = match fit(&samples, options.method, options.ridge) {
            Ok(f) => f,
            // Every prompt ends with the same template token, so at the embeddings (and only
            // there) the compliant activations can be identical: no direction to find.
            Err(FitError::NoSpread) => {
                log(format!(
                    "point {point:>3}: compliant activations are all equal; zero vector"
                ));
                points.push(PointFit {
                    norm: 0.0,
                    residual_norm: scale,
                    lambda: None,
                    heldout_auc: None,
                    protected: None,
                });
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("fitting point {point}")),
        };
        let mut v = fitted.vector;
        let mut protected = None;
        if !protect.is_empty() {
            let dirs: Vec<&[f32]> = protect
                .iter()
                .map(|p| &p[point * d..(point + 1) * d])
                .collect();
            let kept = project_out_span(&v, &dirs);
            protected = Some(Protection {
                cosine: cosine(&v, dirs[0]).unwrap_or(0.0),
                surviving_fraction: norm(&kept) / norm(&v).max(f64::MIN_POSITIVE),
            });
            v = kept;
        }
        // A fold can be too small to fit (e.g. one compliant row has no spread for a relative
        // ridge); the point then has no held-out AUC rather than failing the whole fit.
        let auc = match k_fold_auc(
            &samples,
            options.method,
            options.ridge,
            options.folds,
            options.seed,
        ) {
            Ok(auc) => Some(auc),
            Err(e) => {
                log(format!("point {point:>3}: no held-out AUC ({e})"));
                None
            }
        };
        log(format!(
            "point {point:>3}: norm {:>10.4}  held-out AUC {}",
            norm(&v),
            auc.map_or("-".into(), |a| format!("{a:.3}"))
        ));
        vectors[point * d..(point + 1) * d].copy_from_slice(&v);
        points.push(PointFit {
            norm: norm(&v),
            residual_norm: scale,
            lambda: fitted.report.lambda,
            heldout_auc: auc,
            protected,
        });
    }
    let fit = FitMetadata {
        method: options.method,
        ridge: options.ridge,
        n_refusal: count(Class::Refusal),
        n_compliance: count(Class::Compliance),
        points,
        balance: options.balance.as_ref().map(|strata| Balance {
            by: strata.by.clone(),
            rows: strata.rows(&classes),
        }),
    };
    let mut provenance = BTreeMap::new();
    for key in ["model", "model_sha256", "position", "format"] {
        if let Some(v) = h.metadata.get(key) {
            provenance.insert(key.to_string(), v.clone());
        }
    }
    Ok(SteeringVectors::new(vectors, h.n_points, h.d, provenance)?.with_fit(fit)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use refusal_steer_data::activations::ActivationsHeader;

    /// `n` rows, 3 points of dimension `d`: at point 2 the first half of the rows is shifted by
    /// `shift` along `planted`; the rest is noise. Sets: first half "a", second half "b".
    pub(crate) fn planted(
        n: usize,
        d: usize,
        planted: &[f32],
        shift: f32,
        seed: u64,
    ) -> Activations {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = Vec::with_capacity(n * 3 * d);
        for row in 0..n {
            for point in 0..3 {
                for (j, &p) in planted.iter().enumerate().take(d) {
                    let noise: f32 = rng.gen_range(-1.0..1.0);
                    // Point 0 identical for every row, like the embeddings of a shared token.
                    let base = if point == 0 { j as f32 * 0.01 } else { noise };
                    let on = point == 2 && row < n / 2;
                    data.push(base + if on { shift * p } else { 0.0 });
                }
            }
        }
        Activations {
            header: ActivationsHeader {
                n_points: 3,
                d,
                ids: (0..n).map(|i| format!("p{i}")).collect(),
                sets: (0..n)
                    .map(|i| Some(if i < n / 2 { "a" } else { "b" }.to_string()))
                    .collect(),
                metadata: BTreeMap::new(),
            },
            data,
        }
    }

    fn unit(d: usize, at: usize) -> Vec<f32> {
        (0..d).map(|j| if j == at { 1.0 } else { 0.0 }).collect()
    }

    #[test]
    fn principal_directions_follow_the_protected_offset_and_are_zero_where_rows_agree() {
        let (n, d) = (40, 16);
        let dir = unit(d, 5);
        let acts = planted(n, d, &dir, 6.0, 2);
        let (a, b): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| i < n / 2);
        let found = principal_directions_per_point(&acts, &a, &b, 3).unwrap();
        assert_eq!(found.len(), 3);
        let at = |v: &[f32], point: usize| v[point * d..(point + 1) * d].to_vec();
        // Point 2: the shift dominates the offsets, so it is the first direction.
        assert!(cosine(&at(&found[0], 2), &dir).unwrap().abs() > 0.95);
        for direction in &found {
            assert!((norm(&at(direction, 2)) - 1.0).abs() < 1e-5);
            // Point 0 is the same for every row: no spread, nothing to protect.
            assert!(at(direction, 0).iter().all(|&x| x == 0.0));
        }
        assert!(principal_directions_per_point(&acts, &a, &[], 1).is_err());
    }

    #[test]
    fn a_planted_direction_is_found_its_steering_flips_a_classifier_and_protection_removes_it() {
        let (n, d) = (40, 16);
        let dir = unit(d, 3);
        let acts = planted(n, d, &dir, 4.0, 1);
        // Rows of set "a" refused (c = 1), set "b" answered (c = -1).
        let c: Vec<Option<f64>> = (0..n)
            .map(|i| Some(if i < n / 2 { 1.0 } else { -1.0 }))
            .collect();
        let options = FitOptions {
            method: Method::Md,
            ridge: Ridge::Relative(1.0),
            threshold: 0.1,
            folds: 5,
            seed: 0,
            balance: None,
        };
        let v = fit_points(&acts, &c, &options, &[], &mut |_| {}).unwrap();
        let at2 = v.point(2).unwrap();
        let cos = cosine(at2, &dir).unwrap();
        assert!(cos > 0.95, "cos {cos}");
        let fitted = v.fit.as_ref().unwrap();
        let auc = fitted.heldout_aucs();
        assert!(auc[2].unwrap() > 0.95 && auc[1].unwrap() < 0.8, "{auc:?}");
        assert_eq!(fitted.recommended_points(), vec![2]);
        // A linear "refusal" classifier at point 2: projection on the direction above the
        // midpoint. Adding -1 * v (the fitted mean difference) to a refused row flips it.
        let x = acts.at_point(2);
        let proj = |row: &[f32]| row.iter().zip(&dir).map(|(a, b)| a * b).sum::<f32>();
        let refused = &x[0..d];
        assert!(proj(refused) > 2.0);
        let steered: Vec<f32> = refused.iter().zip(at2).map(|(x, v)| x - v).collect();
        assert!(proj(&steered) < 2.0, "{}", proj(&steered));
        // Protecting the same direction leaves nothing of it.
        let protect: Vec<f32> = (0..3).flat_map(|_| dir.clone()).collect();
        let p = fit_points(&acts, &c, &options, &[&protect], &mut |_| {}).unwrap();
        assert!(cosine(p.point(2).unwrap(), &dir).unwrap().abs() < 1e-6);
        let surviving = p.fit.as_ref().unwrap().points[2].protected.unwrap();
        assert!(surviving.surviving_fraction < 0.5, "{surviving:?}");
        // The residual scale that norm-scaled strengths use is recorded per point.
        assert!(fitted.points.iter().all(|p| p.residual_norm > 0.0));
    }

    #[test]
    fn balanced_fits_record_their_strata_and_a_mismatched_count_is_an_error() {
        let (n, d) = (20, 8);
        let acts = planted(n, d, &unit(d, 2), 4.0, 3);
        let c: Vec<Option<f64>> = (0..n)
            .map(|i| Some(if i < n / 2 { 1.0 } else { -1.0 }))
            .collect();
        // Rows 0-1 and 10-15 "Mandarin", the rest "Latin".
        let labels: Vec<String> = (0..n)
            .map(|i| {
                if i < 2 || (10..16).contains(&i) {
                    "Mandarin"
                } else {
                    "Latin"
                }
                .into()
            })
            .collect();
        let strata = Strata::from_labels("prompt script", &labels);
        assert_eq!(strata.names, ["Mandarin", "Latin"]);
        let prompt = |id: &str, text: &str| Prompt {
            id: id.into(),
            prompt: text.into(),
            set: None,
        };
        let prompts = [
            prompt("zh", "中国政府如何发现并破解Shadowsocks?"),
            prompt("en", "How does the Great Firewall work?"),
        ];
        let ids = ["en".to_string(), "zh".to_string()];
        let by_script = Strata::prompt_scripts(&ids, &prompts).unwrap();
        assert_eq!(
            (by_script.names, by_script.of_row),
            (
                vec!["Latin".to_string(), "Mandarin".to_string()],
                vec![0, 1]
            )
        );
        let err = Strata::prompt_scripts(&["gone".to_string()], &prompts).unwrap_err();
        assert!(
            err.to_string()
                .contains("activation row gone has no prompt"),
            "{err}"
        );
        let mut options = FitOptions {
            method: Method::Wrmd,
            ridge: Ridge::Relative(1.0),
            threshold: 0.1,
            folds: 2,
            seed: 0,
            balance: Some(strata.clone()),
        };
        let v = fit_points(&acts, &c, &options, &[], &mut |_| {}).unwrap();
        let balance = v.fit.as_ref().unwrap().balance.clone().unwrap();
        assert_eq!(balance.by, "prompt script");
        assert_eq!(balance.rows["Mandarin"], [2, 6]);
        assert_eq!(balance.rows["Latin"], [8, 4]);
        assert!(cosine(v.point(2).unwrap(), &unit(d, 2)).unwrap() > 0.9);
        options.balance = Some(Strata {
            of_row: strata.of_row[1..].to_vec(),
            ..strata
        });
        let err = fit_points(&acts, &c, &options, &[], &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("19 strata for 20 activation rows"),
            "{err}"
        );
    }

    #[test]
    fn too_few_prompts_of_a_class_is_a_clear_error() {
        let acts = planted(6, 4, &unit(4, 0), 3.0, 2);
        let c = vec![Some(1.0), Some(1.0), Some(1.0), Some(1.0), Some(1.0), None];
        let options = FitOptions {
            method: Method::Wrmd,
            ridge: Ridge::Relative(1.0),
            threshold: 0.1,
            folds: 2,
            seed: 0,
            balance: None,
        };
        let err = fit_points(&acts, &c, &options, &[], &mut |_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("compliance"), "{err:#}");
    }
}
