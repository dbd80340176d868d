//! WRMD on one layer at a realistic size, d = 4096 (goal <= 2 s per layer): n = 2000 rows
//! per layer (1000 per class, the case) and 2000 rows per class (4000 in all).
//! Run at one thread with `RAYON_NUM_THREADS=1 cargo bench -p refusal-steer-steer --bench fit`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use refusal_steer_steer::{fit, Class, Method, Ridge, Samples};

const D: usize = 4096;

/// splitmix64 mapped to [-1, 1): the timing does not depend on the distribution.
fn pseudo_random(n: usize) -> Vec<f32> {
    let mut state = 0x5EED_u64;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn wrmd_one_layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("fit");
    // A fit takes 0.2 s (n = 2000) to 0.8 s (n = 4000) at one thread: ten samples each.
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for n_per_class in [1000, 2000] {
        let x = pseudo_random(2 * n_per_class * D);
        let classes: Vec<Class> = (0..2 * n_per_class)
            .map(|i| {
                if i < n_per_class {
                    Class::Refusal
                } else {
                    Class::Compliance
                }
            })
            .collect();
        let weights: Vec<f64> = (0..2 * n_per_class)
            .map(|i| 0.2 + (i % 5) as f64 * 0.2)
            .collect();
        let samples = Samples::new(&x, D, &classes, &weights).unwrap();
        group.bench_function(format!("wrmd_d{D}_n{n_per_class}x2"), |b| {
            b.iter(|| fit(&samples, Method::Wrmd, Ridge::Relative(0.1)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, wrmd_one_layer);
criterion_main!(benches);
