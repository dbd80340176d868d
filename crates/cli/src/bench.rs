//! `refusal-steer bench`: prefill and decode throughput on one model, measured the way
//! llama-bench measures (`pp`: one forward pass over N prompt tokens; `tg`: N tokens decoded
//! one at a time), so `scripts/bench/engine_vs_llama_cpp.sh` can print the ratio.
//!
//! `--batch B` runs every test on B sequences at once, as `llama-batched-bench -npl B` does
//! (`pp`: B prompts of N tokens in one forward pass; `tg`: N steps of B tokens each), and
//! counts every row's tokens: the aggregate throughput of batched generation.
//!
//! With `--recipe FILE` or `--steer FILE` (and the other steering options of `generate`), every test is also run
//! with the steering hooks installed, repetitions interleaved with the plain ones so that a
//! loaded machine slows both alike, and the steered/plain ratio of the medians is printed.

use crate::steering::SteerArgs;
use crate::ModelArg;
use anyhow::Result;
use clap::Args;
use rayon::prelude::*;
use refusal_steer_engine::kv_cache::KvCache;
use refusal_steer_engine::{Hooks, Logits, Model};
use refusal_steer_pipeline::recipe::hooks_for;
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
    /// Tokens already in the cache when each test starts (run untimed), as llama-bench's -d:
    /// what decode and prefill cost deep into a long conversation.
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// Sequences run side by side in every test (prefill and decode), each its own row of
    /// the cache; tokens per second count all of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    batch: u64,
    /// Timed repetitions of each test (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Also time a plain read of 512 MiB on the same threads: the ceiling for the weight
    /// bandwidth that decode reaches (`weight_gb_per_s` of each `tg` test).
    #[arg(long)]
    read_bandwidth: bool,
    /// Steering to time against no steering (e.g. `--steer v.safetensors --alpha -4`).
    #[command(flatten)]
    steer: SteerArgs,
}

/// Deterministic token ids spread over the vocabulary (llama-bench uses random ones).
fn tokens(model: &Model, n: usize) -> Vec<u32> {
    let vocab = model.config.vocab_size as u64;
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + 17) % vocab.min(30_000)) as u32)
        .collect()
}

/// What one timed test runs: `rows` sequences, each `depth` tokens deep before it starts.
#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    depth: usize,
}

/// A cache of `shape.rows` rows, each holding `shape.depth` tokens, unsteered, with room for
/// `more`.
fn cache_at_depth(model: &Model, shape: Shape, more: usize) -> Result<KvCache> {
    let Shape { rows, depth } = shape;
    let mut cache = model.new_cache(rows, depth + more);
    if depth > 0 {
        let chunk = cache.begin(vec![true; rows * depth], depth, true)?;
        let ids = tokens(model, depth).repeat(rows);
        model.forward(
            &ids,
            &chunk,
            &mut cache,
            &mut model.new_hooks(),
            Logits::Last,
        )?;
    }
    Ok(cache)
}

fn prefill(model: &Model, ids: &[u32], shape: Shape, mut hooks: Hooks) -> Result<f64> {
    let mut cache = cache_at_depth(model, shape, ids.len())?;
    let chunk = cache.begin(vec![true; shape.rows * ids.len()], ids.len(), true)?;
    let batch = ids.repeat(shape.rows);
    let start = Instant::now();
    model.forward(&batch, &chunk, &mut cache, &mut hooks, Logits::Last)?;
    Ok(start.elapsed().as_secs_f64())
}

fn decode(model: &Model, ids: &[u32], shape: Shape, mut hooks: Hooks) -> Result<f64> {
    let mut cache = cache_at_depth(model, shape, ids.len())?;
    let start = Instant::now();
    for &id in ids {
        let chunk = cache.begin(vec![true; shape.rows], 1, false)?;
        let step = vec![id; shape.rows];
        model.forward(&step, &chunk, &mut cache, &mut hooks, Logits::Last)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// One test's record: tokens/s as mean, standard deviation and median of the repetitions.
fn record(test: String, n: usize, times: &[f64]) -> (serde_json::Value, f64) {
    let rates: Vec<f64> = times.iter().map(|t| n as f64 / t).collect();
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let sd = (rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64).sqrt();
    let med = median(&rates);
    (
        serde_json::json!({"test": test, "tokens_per_second": mean, "stddev": sd, "median": med}),
        med,
    )
}

/// GB/s of the best of three parallel reads of a buffer far larger than any cache.
fn read_bandwidth_gb_per_s() -> f64 {
    const BYTES: usize = 512 << 20;
    let buffer = vec![1u64; BYTES / 8];
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let sum = buffer
                .par_chunks(1 << 17)
                .map(|chunk| chunk.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            BYTES as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
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
    let (recipe, steer) = args.steer.recipe(&model)?.unzip();
    let steered = recipe.is_some();
    let mut results = Vec::new();
    let mut ratios = Vec::new();
    let shape = Shape {
        rows: args.batch as usize,
        depth: args.depth,
    };
    type Run = fn(&Model, &[u32], Shape, Hooks) -> Result<f64>;
    for (test, n, run) in [
        ("pp", args.prompt_tokens, prefill as Run),
        ("tg", args.gen_tokens, decode as Run),
    ] {
        if n == 0 {
            continue;
        }
        let ids = tokens(&model, n);
        let with_steering = || hooks_for(&model, recipe.as_ref());
        // Warm-up, then the timed repetitions, plain and steered interleaved.
        run(&model, &ids, shape, model.new_hooks())?;
        if steered {
            run(&model, &ids, shape, with_steering()?)?;
        }
        let (mut plain, mut steered_times) = (Vec::new(), Vec::new());
        for _ in 0..args.repetitions.max(1) {
            plain.push(run(&model, &ids, shape, model.new_hooks())?);
            if steered {
                steered_times.push(run(&model, &ids, shape, with_steering()?)?);
            }
        }
        let mut test = format!("{test}{n}");
        if shape.depth > 0 {
            test += &format!("@d{}", shape.depth);
        }
        if shape.rows > 1 {
            test += &format!("x{}", shape.rows);
        }
        let counted = n * shape.rows;
        let (mut plain_record, plain_median) = record(test.clone(), counted, &plain);
        if test.starts_with("tg") {
            // Every decode step reads each weight once, whatever the batch.
            let steps_per_second = plain_median / shape.rows as f64;
            plain_record["weight_gb_per_s"] =
                (steps_per_second * model.matrix_bytes as f64 / 1e9).into();
        }
        results.push(plain_record);
        if steered {
            let (steered_record, steered_median) =
                record(format!("{test}+steer"), counted, &steered_times);
            results.push(steered_record);
            ratios.push(serde_json::json!({
                "test": test,
                "steered_over_plain": steered_median / plain_median,
            }));
        }
    }
    let mut out = serde_json::json!({
        "model": model.path.display().to_string(),
        "threads": threads,
        "results": results,
        "weight_bytes": model.matrix_bytes,
        "peak_rss_mb": peak_rss_mb(),
    });
    if args.read_bandwidth {
        drop(model);
        out["read_gb_per_s"] = read_bandwidth_gb_per_s().into();
    }
    if let Some(steer) = steer {
        out["steer"] = steer;
        out["steered_over_plain"] = serde_json::Value::Array(ratios);
    }
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }
}
