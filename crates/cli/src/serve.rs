//! `refusal-steer serve`: the model behind an OpenAI-compatible API, with recipes chosen per
//! request (see the `refusal-steer-serve` crate).

use crate::ModelArg;
use anyhow::{Context, Result};
use clap::Args;
use refusal_steer_pipeline::Recipe;
use refusal_steer_serve::{serve, ServeOptions};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A recipe requests may choose, as NAME=FILE (repeatable): by the model name `M+NAME` or
    /// the body field `steering: {"recipe": "NAME", "scale": S}`.
    #[arg(long = "recipe", value_name = "NAME=FILE")]
    recipes: Vec<String>,
    /// Address to listen on (loopback by default: steering is not access control).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most rows (requests x choices) generated together.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most requests waiting for the engine; more are answered 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// max_tokens of a request that gives none (bounded by the context left).
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: the REFUSAL_STEER_API_KEY
    /// environment variable, if set).
    #[arg(long, env = "REFUSAL_STEER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Seconds requests in flight may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    grace_seconds: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let recipes = args
        .recipes
        .iter()
        .map(|spec| load_recipe(spec))
        .collect::<Result<Vec<_>>>()?;
    let model = args.model.load()?;
    let model_id = model_id(&args.model.model);
    let options = ServeOptions {
        host: args.host,
        port: args.port,
        max_rows: args.max_batch,
        queue: args.queue,
        default_max_tokens: args.default_max_tokens,
        api_key: args.api_key,
        grace: std::time::Duration::from_secs(args.grace_seconds),
    };
    let names: Vec<String> = recipes
        .iter()
        .map(|(n, _)| format!("{model_id}+{n}"))
        .collect();
    serve(model, model_id.clone(), recipes, &options, |address| {
        eprintln!(
            "listening on http://{address} (models: {model_id}{})",
            names.iter().map(|n| format!(", {n}")).collect::<String>()
        );
    })
}

fn load_recipe(spec: &str) -> Result<(String, Recipe)> {
    let (name, file) = spec
        .split_once('=')
        .with_context(|| format!("--recipe {spec:?} must be NAME=FILE, e.g. --recipe free=runs/default/recommended.steer.safetensors"))?;
    let recipe =
        Recipe::load(&PathBuf::from(file)).with_context(|| format!("--recipe {name}={file}"))?;
    Ok((name.to_string(), recipe))
}

/// The model's name in the API: the catalogue name, or the file's stem for a path.
fn model_id(model: &str) -> String {
    let path = Path::new(model);
    if path.extension().is_some_and(|e| e == "gguf") {
        path.file_stem()
            .map_or(model.to_string(), |s| s.to_string_lossy().into_owned())
    } else {
        model.to_string()
    }
}
