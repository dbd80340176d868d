//! What the tiny-model test files share.

use refusal_steer_engine::{tiny, Model};

/// The tiny random-weight model, run on one thread, in a folder that lives as long as it.
pub fn model() -> (tempfile::TempDir, Model) {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path).unwrap();
    let model = Model::load(&path).unwrap();
    (dir, model)
}
