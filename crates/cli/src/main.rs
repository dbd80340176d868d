//! `refusal-steer`: the command line. Parses arguments and calls the library crates.

mod analyze;
mod bench;
mod calibrate;
mod capture;
mod chat;
mod exchange;
mod fit;
mod gate_eval;
mod generate;
mod judge;
mod run;
mod serve;
mod steering;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use refusal_steer_catalog as catalog;
use refusal_steer_engine::Model;

#[derive(Parser)]
#[command(
    name = "refusal-steer",
    version,
    about = "Find, apply and measure steering vectors that remove or induce refusals."
)]
struct Cli {
    /// Inference threads (default: all physical cores).
    #[arg(long, global = true, env = "REFUSAL_STEER_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole method: answer, judge, capture, fit, tune on validation prompts, evaluate on
    /// test prompts, report. Resumable; with no arguments it runs the default config.
    Run(run::RunArgs),
    /// List or fetch the catalogue's models.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        text: String,
        /// Print the token pieces as well.
        #[arg(long)]
        pieces: bool,
        /// Add BOS/EOS as the model file asks.
        #[arg(long)]
        add_special: bool,
        /// Treat special-token text (like <|im_start|>) as plain text.
        #[arg(long)]
        no_parse_special: bool,
    },
    /// Answer prompts, writing one JSONL line per (prompt, sample). Resumable.
    Generate(generate::GenerateArgs),
    /// Chat interactively, streaming the answers.
    Chat(chat::ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, each request choosing its recipe.
    Serve(serve::ServeArgs),
    /// Record the residual stream at every point for each prompt. Resumable.
    Capture(capture::CaptureArgs),
    /// Fit one steering vector per point from activations and labels.
    Fit(fit::FitArgs),
    /// Per-point held-out AUC, norms, angles and dimensionality of a vector file (JSON, Markdown, SVG).
    Analyze(analyze::AnalyzeArgs),
    /// Write steering vectors as a llama.cpp control vector (GGUF).
    Export(exchange::ExportArgs),
    /// Read a llama.cpp control vector into a steering-vector file.
    Import(exchange::ImportArgs),
    /// Measure prefill and decode speed (tokens per second), as llama-bench does.
    Bench(bench::BenchArgs),
    /// Judge each answer: refusal or not, with the judge's probability. Resumable.
    Judge(judge::JudgeArgs),
    /// Refusal confidence c per prompt from its judged answers (readable by `fit --labels`).
    Score(judge::ScoreArgs),
    /// Measure judges against the labelled corpus, out of sample (kappa, recall per refusal
    /// type, false refusals, speed); fit and save a probe judge.
    Calibrate(calibrate::CalibrateArgs),
    /// Measure the topic gate on a labelled prompt corpus, each source held out in turn (pass
    /// rates per set, source and language, with Wilson intervals).
    GateEval(gate_eval::GateEvalArgs),
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Show the known models and whether each is cached.
    List,
    /// Download and verify a model (a no-op when the cache already has it).
    Fetch { name: String },
}

#[derive(Args, Clone)]
pub struct ModelArg {
    /// A catalogue name (see `models list`), a path to a .gguf file, or a Hugging Face
    /// checkpoint folder (config.json, tokenizer.json, *.safetensors).
    #[arg(long, default_value = catalog::DEFAULT_MODEL)]
    pub model: String,
    /// For reasoning models whose chat template has the switch (`enable_thinking`, as Qwen3):
    /// on lets the model reason before it answers, off renders the empty reasoning block.
    /// Unset: the template's default.
    #[arg(long, value_parser = on_off)]
    pub thinking: Option<bool>,
}

impl ModelArg {
    pub fn load(&self) -> Result<Model> {
        load_model(&self.model, self.thinking)
    }
}

/// Resolves and loads a model, with the chat template's thinking switch set.
pub fn load_model(name: &str, thinking: Option<bool>) -> Result<Model> {
    let path = catalog::resolve(name, &mut |msg| eprintln!("{msg}"))?;
    let mut model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    model
        .template
        .set_thinking(thinking)
        .with_context(|| format!("--thinking / thinking with {}", path.display()))?;
    Ok(model)
}

pub fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got '{other}'")),
    }
}

fn main() {
    let cli = Cli::parse();
    // The kernels read their thread count from the environment on first use.
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.max(1).to_string());
    }
    // candle's own worker pool (its K-quant matmuls) spins after each job before sleeping,
    // taking the cores our kernels' workers need next: at 2 threads, Qwen2.5-0.5B decoded
    // 38 tok/s with its default spin and 55 without.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    if let Err(e) = run(cli.command) {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each cause once: many errors already name their cause.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1).map(ToString::to_string) {
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Models {
            action: ModelsAction::List,
        } => {
            println!(
                "{:<30} {:<8} {:<8} {:>6} {:<5} cached",
                "name", "arch", "quant", "MB", "chat"
            );
            for m in catalog::CATALOGUE {
                let cached = catalog::cached_path(m);
                let state = if cached.is_file() {
                    cached.display().to_string()
                } else {
                    "-".into()
                };
                let default = if m.name == catalog::DEFAULT_MODEL {
                    " (default)"
                } else {
                    ""
                };
                println!(
                    "{:<30} {:<8} {:<8} {:>6} {:<5} {state}{default}",
                    m.name,
                    m.architecture,
                    m.quantization,
                    m.bytes / 1_000_000,
                    if m.chat { "yes" } else { "no" }
                );
            }
            println!(
                "cache: {} (set {} to move it)",
                catalog::cache_dir().display(),
                catalog::CACHE_ENV
            );
        }
        Command::Models {
            action: ModelsAction::Fetch { name },
        } => {
            let entry = catalog::find(&name).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown model '{name}'; run `refusal-steer models list` for the known names"
                )
            })?;
            let path = catalog::fetch(entry, &mut |msg| eprintln!("{msg}"))?;
            println!("{}", path.display());
        }
        Command::Tokenize {
            model,
            text,
            pieces,
            add_special,
            no_parse_special,
        } => {
            let path = catalog::resolve(&model.model, &mut |msg| eprintln!("{msg}"))?;
            let tokenizer = refusal_steer_engine::read_tokenizer(&path)?;
            let ids = tokenizer.encode(&text, add_special, !no_parse_special);
            println!("{}", serde_json::to_string(&ids)?);
            if pieces {
                let pieces: Vec<&str> = ids
                    .iter()
                    .map(|&id| tokenizer.piece(id))
                    .collect::<Result<_, _>>()?;
                println!("{}", serde_json::to_string(&pieces)?);
            }
        }
        Command::Run(args) => run::run(args)?,
        Command::Generate(args) => generate::run(args)?,
        Command::Chat(args) => chat::run(args)?,
        Command::Serve(args) => serve::run(args)?,
        Command::Capture(args) => capture::run(args)?,
        Command::Fit(args) => fit::run(args)?,
        Command::Analyze(args) => analyze::run(args)?,
        Command::Export(args) => exchange::export(args)?,
        Command::Import(args) => exchange::import(args)?,
        Command::Bench(args) => bench::run(args)?,
        Command::Judge(args) => judge::run(args)?,
        Command::Score(args) => judge::score(args)?,
        Command::Calibrate(args) => calibrate::calibrate(args)?,
        Command::GateEval(args) => gate_eval::run(args)?,
    }
    Ok(())
}
