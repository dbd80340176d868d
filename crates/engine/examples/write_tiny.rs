//! Writes the tiny models of every variant into a folder: GGUF files for the llama.cpp
//! reference script (`scripts/reference/make_tiny_fixtures.py`) and checkpoint folders for
//! the transformers one (`scripts/reference/make_tiny_hf_fixtures.py`):
//!   cargo run --release -p refusal-steer-engine --example write_tiny -- OUT_DIR

use refusal_steer_engine::tiny::{write_checkpoint, write_variant, HfVariant, Variant};
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: write_tiny OUT_DIR"));
    std::fs::create_dir_all(&dir).expect("create the output folder");
    for variant in Variant::ALL {
        let path = dir.join(format!("tiny-{}.gguf", variant.name()));
        write_variant(&path, variant).expect("write the tiny model");
        println!("{}", path.display());
    }
    for variant in HfVariant::ALL {
        let path = dir.join(format!("tiny-hf-{}", variant.name()));
        write_checkpoint(&path, variant).expect("write the tiny checkpoint");
        println!("{}", path.display());
    }
}
