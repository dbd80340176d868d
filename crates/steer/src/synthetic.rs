//! Synthetic activations with a known refusal direction, for tests.

use crate::fit::Class;
use crate::rng::SplitMix64;

/// Axes 0..NOISY_AXES carry strong noise; the true direction lies in the quiet axes.
const NOISY_AXES: usize = 4;
const NOISY_STD: f64 = 10.0;
const QUIET_STD: f64 = 0.5;
/// Distance between the class means along the true direction.
const SEPARATION: f64 = 3.0;

#[derive(Debug, Clone)]
pub(crate) struct Dataset {
    pub x: Vec<f32>,
    pub d: usize,
    pub classes: Vec<Class>,
    pub weights: Vec<f64>,
    /// Unit vector from the compliance mean to the refusal mean.
    pub direction: Vec<f64>,
}

/// `n_per_class` refusal and compliance rows of weight 1 whose means differ along a random
/// unit direction orthogonal to the noisy axes, followed by `n_mislabelled` rows of each
/// class carrying the other class's label and weight 0.01 (low judge confidence).
pub(crate) fn anisotropic_classes(
    d: usize,
    n_per_class: usize,
    n_mislabelled: usize,
    seed: u64,
) -> Dataset {
    classes_with_noise(d, n_per_class, n_mislabelled, NOISY_STD, seed)
}

/// As [`anisotropic_classes`] without mislabelled rows, with the same small noise on every axis.
pub(crate) fn isotropic_classes(d: usize, n_per_class: usize, seed: u64) -> Dataset {
    classes_with_noise(d, n_per_class, 0, QUIET_STD, seed)
}

fn classes_with_noise(
    d: usize,
    n_per_class: usize,
    n_mislabelled: usize,
    noisy_std: f64,
    seed: u64,
) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let mut direction: Vec<f64> = (0..d)
        .map(|j| if j < NOISY_AXES { 0.0 } else { rng.gaussian() })
        .collect();
    let norm = direction.iter().map(|x| x * x).sum::<f64>().sqrt();
    direction.iter_mut().for_each(|x| *x /= norm);

    let mut data = Dataset {
        x: Vec::new(),
        d,
        classes: Vec::new(),
        weights: Vec::new(),
        direction,
    };
    let groups = [
        (Class::Refusal, Class::Refusal, n_per_class, 1.0),
        (Class::Compliance, Class::Compliance, n_per_class, 1.0),
        (Class::Refusal, Class::Compliance, n_mislabelled, 0.01),
        (Class::Compliance, Class::Refusal, n_mislabelled, 0.01),
    ];
    for (truth, label, count, weight) in groups {
        let side = if truth == Class::Refusal { 0.5 } else { -0.5 };
        for _ in 0..count {
            for j in 0..d {
                let std = if j < NOISY_AXES { noisy_std } else { QUIET_STD };
                data.x
                    .push((side * SEPARATION * data.direction[j] + std * rng.gaussian()) as f32);
            }
            data.classes.push(label);
            data.weights.push(weight);
        }
    }
    data
}

/// Pure noise: `n` rows per class from the same isotropic distribution.
pub(crate) fn noise_classes(d: usize, n: usize, seed: u64) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let x = (0..2 * n * d).map(|_| rng.gaussian() as f32).collect();
    let classes = (0..2 * n)
        .map(|i| {
            if i % 2 == 0 {
                Class::Refusal
            } else {
                Class::Compliance
            }
        })
        .collect();
    Dataset {
        x,
        d,
        classes,
        weights: vec![1.0; 2 * n],
        direction: vec![0.0; d],
    }
}

/// Angle in degrees between a fitted vector and a reference direction (180 when opposite).
pub(crate) fn angle_degrees(v: &[f32], reference: &[f64]) -> f64 {
    let dot = crate::linalg::dot_f64(v, reference);
    let norm_v = crate::linalg::norm(v);
    let norm_r = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    (dot / (norm_v * norm_r))
        .clamp(-1.0, 1.0)
        .acos()
        .to_degrees()
}
