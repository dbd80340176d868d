use super::heldout::{ranks_up_to, top_coordinates};
use super::*;
use crate::fit_metadata::{FitMetadata, PointFit};
use crate::synthetic::{isotropic_classes, noise_classes, Dataset};
use crate::{fit, Samples};
use refusal_steer_data::activations::ActivationsHeader;
use std::collections::BTreeMap;

/// Two points: 0 is pure noise, 1 carries a planted direction, for the same prompts.
fn planted() -> (Activations, HashMap<String, f64>, Dataset) {
    let d = 24;
    let signal = isotropic_classes(d, 60, 31);
    let noise = noise_classes(d, 60, 32);
    // noise_classes alternates the labels; give its rows the signal set's labels instead.
    let n = signal.classes.len();
    let mut data = Vec::with_capacity(n * 2 * d);
    for i in 0..n {
        data.extend_from_slice(&noise.x[i * d..(i + 1) * d]);
        data.extend_from_slice(&signal.x[i * d..(i + 1) * d]);
    }
    let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let scores = ids
        .iter()
        .zip(&signal.classes)
        .map(|(id, c)| (id.clone(), if *c == Class::Refusal { 0.8 } else { -0.7 }))
        .collect();
    let acts = Activations {
        header: ActivationsHeader {
            n_points: 2,
            d,
            ids,
            sets: vec![None; n],
            metadata: BTreeMap::new(),
        },
        data,
    };
    (acts, scores, signal)
}

/// MD vectors fitted on all rows at every point, as `fit` would write them.
fn md_vectors(acts: &Activations, scores: &HashMap<String, f64>) -> SteeringVectors {
    let h = &acts.header;
    let classes: Vec<Class> = h
        .ids
        .iter()
        .map(|id| {
            if scores[id] > 0.0 {
                Class::Refusal
            } else {
                Class::Compliance
            }
        })
        .collect();
    let weights = vec![1.0; classes.len()];
    let mut all = Vec::new();
    for p in 0..h.n_points {
        let x = acts.at_point(p);
        let samples = Samples::new(&x, h.d, &classes, &weights).unwrap();
        all.extend(
            fit(&samples, Method::Md, Ridge::Relative(1.0))
                .unwrap()
                .vector,
        );
    }
    SteeringVectors::new(all, h.n_points, h.d, BTreeMap::new()).unwrap()
}

#[test]
fn planted_point_separates_and_noise_point_does_not() {
    let (acts, scores, signal) = planted();
    let vectors = md_vectors(&acts, &scores);
    let analysis = analyze(&acts, &scores, &vectors, None, &AnalysisOptions::default()).unwrap();
    let (noise, planted) = (&analysis.points[0], &analysis.points[1]);
    let planted_auc = planted.heldout_auc.unwrap();
    let noise_auc = noise.heldout_auc.unwrap();
    assert!(planted_auc > 0.98, "planted point AUC {planted_auc}");
    assert!(
        (noise_auc - 0.5).abs() < 0.15,
        "noise point AUC {noise_auc}"
    );
    assert!(planted.heldout_pearson.unwrap() > 0.8);
    assert_eq!(analysis.best_points, vec![1]);
    assert_eq!((analysis.n_refusal, analysis.n_compliance), (60, 60));

    // The file's vector at the planted point lies along the planted direction.
    let planted_vector = vectors.point(1).unwrap();
    let direction: Vec<f32> = signal.direction.iter().map(|&x| x as f32).collect();
    assert!(cosine(planted_vector, &direction).unwrap() > 0.9);

    // The mean difference is the planted direction, so the top components hold most of it
    // and a probe on a handful of components already separates.
    let dims = planted.dimensionality.as_ref().unwrap();
    let last = dims.mean_difference_in_top_pcs.last().unwrap();
    assert!((last.value - 1.0).abs() < 1e-9, "{last:?}");
    assert!(dims.mean_difference_in_top_pcs[0].value > 0.5, "{dims:?}");
    assert!(dims.pcs_for_90_percent <= 8, "{dims:?}");
    assert!(dims.probe_auc_top_pcs[0].value > 0.95, "{dims:?}");
    let full = dims.probe_auc_top_coordinates.last().unwrap();
    assert_eq!(full.k, 24);
    assert!((full.value - planted_auc).abs() < 1e-12);
}

#[test]
fn heldout_auc_matches_k_fold_auc_with_the_same_seed() {
    let (acts, scores, _) = planted();
    let vectors = md_vectors(&acts, &scores);
    let options = AnalysisOptions {
        folds: 4,
        seed: 9,
        threshold: 0.1,
    };
    let analysis = analyze(&acts, &scores, &vectors, None, &options).unwrap();
    let classes: Vec<Class> = acts
        .header
        .ids
        .iter()
        .map(|id| {
            if scores[id] > 0.0 {
                Class::Refusal
            } else {
                Class::Compliance
            }
        })
        .collect();
    let weights: Vec<f64> = acts.header.ids.iter().map(|id| scores[id].abs()).collect();
    for p in 0..2 {
        let x = acts.at_point(p);
        let samples = Samples::new(&x, acts.header.d, &classes, &weights).unwrap();
        let expected = crate::k_fold_auc(&samples, Method::Md, Ridge::Relative(1.0), 4, 9).unwrap();
        assert_eq!(analysis.points[p].heldout_auc, Some(expected));
    }
}

#[test]
fn comparing_a_file_with_itself() {
    let (acts, scores, _) = planted();
    let vectors = md_vectors(&acts, &scores);
    let analysis = analyze(
        &acts,
        &scores,
        &vectors,
        Some(&vectors),
        &AnalysisOptions::default(),
    )
    .unwrap();
    for p in &analysis.points {
        let compare = p.compare.as_ref().unwrap();
        assert!((compare.cosine.unwrap() - 1.0).abs() < 1e-9);
        assert!(compare.surviving_norm_fraction.unwrap() < 1e-6);
        assert_eq!(compare.heldout_auc, p.heldout_auc);
        assert_eq!(compare.file_auc, p.file_auc);
    }
    assert_eq!(analysis.compare_method.as_deref(), Some("md"));
}

#[test]
fn participation_ratio_cosine_and_surviving_fraction() {
    let d = 16;
    let mut one_hot = vec![0.0f32; d];
    one_hot[3] = -2.5;
    assert!((participation_ratio(&one_hot).unwrap() - 1.0).abs() < 1e-12);
    let uniform = vec![0.3f32; d];
    assert!((participation_ratio(&uniform).unwrap() - d as f64).abs() < 1e-9);
    assert_eq!(participation_ratio(&vec![0.0; d]), None);

    assert!((cosine(&[1.0, 0.0], &[0.0, 2.0]).unwrap()).abs() < 1e-12);
    assert!((cosine(&[1.0, 1.0], &[-3.0, -3.0]).unwrap() + 1.0).abs() < 1e-12);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
    // v = (3, 4) minus its part along (1, 0) leaves (0, 4): 4/5 of its norm survives.
    assert!((surviving_fraction(&[3.0, 4.0], &[2.0, 0.0]).unwrap() - 0.8).abs() < 1e-12);
    assert_eq!(surviving_fraction(&[3.0, 4.0], &[0.0, 0.0]), None);
}

#[test]
fn best_points_break_auc_ties_by_pearson_and_skip_the_embeddings() {
    let point = |point, auc: Option<f64>, r| PointAnalysis {
        point,
        heldout_auc: auc,
        heldout_pearson: Some(r),
        file_auc: None,
        norm: 1.0,
        cosine_to_previous: None,
        participation_ratio: None,
        dimensionality: None,
        compare: None,
        notes: Vec::new(),
    };
    let points = [
        point(0, Some(1.0), 0.99),
        point(1, Some(1.0), 0.7),
        point(2, None, 0.0),
        point(3, Some(0.97), 0.99),
        point(4, Some(1.0), 0.9),
        point(5, Some(0.99), 0.5),
    ];
    assert_eq!(best_points(&points), vec![4, 1, 5]);
}

#[test]
fn ranks_and_top_coordinates() {
    assert_eq!(ranks_up_to(0), Vec::<usize>::new());
    assert_eq!(ranks_up_to(1), vec![1]);
    assert_eq!(ranks_up_to(8), vec![1, 2, 4, 8]);
    assert_eq!(ranks_up_to(10), vec![1, 2, 4, 8, 10]);
    assert_eq!(
        top_coordinates(&[0.1, -3.0, 2.0, 0.5], 2),
        vec![0.0, -3.0, 2.0, 0.0]
    );
}

#[test]
fn fit_settings_come_from_the_fit_metadata() {
    let plain = SteeringVectors::new(vec![1.0], 1, 1, BTreeMap::new()).unwrap();
    let md = FitSettings {
        method: Method::Md,
        ridge: Ridge::Relative(1.0),
    };
    assert_eq!(FitSettings::of(&plain), md);
    let fit = FitMetadata {
        method: Method::Wrmd,
        ridge: Ridge::Relative(0.25),
        n_refusal: 1,
        n_compliance: 1,
        balance: None,
        points: vec![PointFit {
            norm: 1.0,
            residual_norm: 1.0,
            lambda: Some(0.1),
            heldout_auc: None,
            protected: None,
        }],
    };
    let wrmd = FitSettings::of(&plain.with_fit(fit).unwrap());
    assert_eq!(wrmd.ridge, Ridge::Relative(0.25));
    assert_eq!(wrmd.describe(), "wrmd, kappa 0.25");
}

#[test]
fn bad_inputs_are_errors() {
    let (acts, scores, _) = planted();
    let vectors = md_vectors(&acts, &scores);
    let run = |scores: &HashMap<String, f64>, vectors: &SteeringVectors, folds: usize| {
        let options = AnalysisOptions {
            folds,
            ..AnalysisOptions::default()
        };
        analyze(&acts, scores, vectors, None, &options)
    };
    assert!(matches!(
        run(&scores, &vectors, 1),
        Err(AnalysisError::BadFolds(1))
    ));
    assert!(matches!(
        run(&scores, &vectors, 61),
        Err(AnalysisError::TooFewForFolds { found: 60, .. })
    ));
    let mut nan = scores.clone();
    nan.insert("p3".into(), f64::NAN);
    assert!(matches!(
        run(&nan, &vectors, 5),
        Err(AnalysisError::NonFiniteScore { .. })
    ));
    let wrong = SteeringVectors::new(vec![1.0; 3 * 24], 3, 24, BTreeMap::new()).unwrap();
    let err = run(&scores, &wrong, 5).unwrap_err();
    assert!(matches!(err, AnalysisError::Dimensions { .. }), "{err}");
    // Only a few prompts scored: the rest are counted as unscored and left out.
    let few: HashMap<String, f64> = scores
        .iter()
        .filter(|(id, _)| id[1..].parse::<usize>().unwrap() % 3 == 0)
        .map(|(id, c)| (id.clone(), *c))
        .collect();
    let analysis = run(&few, &vectors, 5).unwrap();
    assert_eq!(analysis.n_unscored, 80);
    assert_eq!(analysis.n_refusal + analysis.n_compliance, 40);
}
