//! What the engine's test files share (each test binary uses its own part of it).
#![allow(dead_code)]

use refusal_steer_engine::{tiny, Logits, Model};

/// The tiny random-weight model, run on one thread, in a folder that lives as long as it.
pub fn model() -> (tempfile::TempDir, Model) {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path).unwrap();
    let model = Model::load(&path).unwrap();
    (dir, model)
}

/// The logits at every position of one sequence, from a fresh cache: `[position][vocab]`.
pub fn logits_at_every_position(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let n = ids.len();
    let mut cache = model.new_cache(1, n);
    let chunk = cache.begin(vec![true; n], n, true).unwrap();
    model
        .forward(ids, &chunk, &mut cache, &mut model.new_hooks(), Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}
