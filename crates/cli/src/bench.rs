//! `refusal-steer bench`: prefill and decode throughput on one model, measured the way
//! llama-bench measures (`pp`: one forward pass over N prompt tokens; `tg`: N tokens decoded
//! one at a time), so `scripts/bench/engine_vs_llama_cpp.sh` can print the ratio.

use crate::ModelArg;
use anyhow::Result;
use clap::Args;
use refusal_steer_engine::{Logits, Model};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt tokens processed in one forward pass.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded one at a time.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Timed repetitions of each test (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
}

/// Deterministic token ids spread over the vocabulary (llama-bench uses random ones).
fn tokens(model: &Model, n: usize) -> Vec<u32> {
    let vocab = model.config.vocab_size as u64;
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + 17) % vocab.min(30_000)) as u32)
        .collect()
}

fn prefill(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache(1, ids.len());
    let chunk = cache.begin(vec![true; ids.len()], ids.len(), true)?;
    let start = Instant::now();
    model.forward(
        ids,
        &chunk,
        &mut cache,
        &mut model.new_hooks(),
        Logits::Last,
    )?;
    Ok(start.elapsed().as_secs_f64())
}

fn decode(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache(1, ids.len());
    let mut hooks = model.new_hooks();
    let start = Instant::now();
    for &id in ids {
        let chunk = cache.begin(vec![true], 1, false)?;
        model.forward(&[id], &chunk, &mut cache, &mut hooks, Logits::Last)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let model = args.model.load()?;
    let threads = std::env::var("RAYON_NUM_THREADS").ok();
    let mut results = Vec::new();
    for (test, n, run) in [
        (
            "pp",
            args.prompt_tokens,
            prefill as fn(&Model, &[u32]) -> Result<f64>,
        ),
        (
            "tg",
            args.gen_tokens,
            decode as fn(&Model, &[u32]) -> Result<f64>,
        ),
    ] {
        if n == 0 {
            continue;
        }
        let ids = tokens(&model, n);
        run(&model, &ids)?;
        let times: Vec<f64> = (0..args.repetitions.max(1))
            .map(|_| run(&model, &ids))
            .collect::<Result<_>>()?;
        let rates: Vec<f64> = times.iter().map(|t| n as f64 / t).collect();
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        let sd =
            (rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64).sqrt();
        results.push(serde_json::json!({"test": format!("{test}{n}"), "tokens_per_second": mean, "stddev": sd}));
    }
    println!(
        "{}",
        serde_json::json!({
            "model": model.path.display().to_string(),
            "threads": threads,
            "results": results,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
