//! What the unit tests share.

use refusal_steer_engine::{tiny, Model};
use tempfile::TempDir;

/// The engine's tiny random model, loaded from a file in a temporary folder that lives as long
/// as the folder returned (recipes hash the file; tests may write beside it).
pub fn tiny_model() -> (TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path).unwrap();
    let model = Model::load(&path).unwrap();
    (dir, model)
}
