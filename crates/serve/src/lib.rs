//! `refusal-steer serve`: the model behind an OpenAI-compatible HTTP API, steering chosen per
//! request.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`. A request picks a recipe loaded at start by naming the model
//! `M+NAME` (so any OpenAI client works unchanged) or by the extra body field
//! `steering: {"recipe": NAME, "scale": S}`; without either it gets the unsteered model. Every
//! reply says what was applied (`steering: {recipe, scale, gated, steered}`, or null), so an
//! off-topic request that a gated recipe left alone is visibly unsteered. No file path is ever
//! taken from a request.
//!
//! Threads: HTTP runs on a small tokio runtime; the model runs on one engine thread
//! ([`scheduler`]) that takes queued requests in rounds and batches those that can share a
//! batch. A full queue answers 429 (with `Retry-After`), a body over [`MAX_BODY_BYTES`] 413,
//! a bad request 400 naming the field, all in OpenAI's error body; the server keeps serving.
//! SIGTERM or SIGINT stops admitting, lets requests in flight finish (up to the grace time)
//! and exits cleanly.
//!
//! A gated recipe's gate judges the last user message of a chat (the completion prompt for
//! `/v1/completions`), formatted as a one-turn chat prompt like the prompts it was fitted on.

/// Largest request body read; larger ones are answered 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub mod api;
mod metrics;
mod routes;
pub mod scheduler;
mod stop;

use anyhow::{bail, Context, Result};
use refusal_steer_engine::Model;
use refusal_steer_pipeline::Recipe;
use scheduler::Served;
use std::net::SocketAddr;
use std::sync::Arc;

/// How the server listens and how much it takes at once.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Most rows (requests × choices) generated together in one round.
    pub max_rows: usize,
    /// Most requests waiting for the engine; more are answered 429.
    pub queue: usize,
    /// `max_tokens` of a request that gives none (bounded by the context left).
    pub default_max_tokens: usize,
    /// When set, `/v1/*` requests must send `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// After SIGTERM or SIGINT, how long requests in flight may take to finish.
    pub grace: std::time::Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_rows: 8,
            queue: 64,
            default_max_tokens: 512,
            api_key: None,
            grace: std::time::Duration::from_secs(30),
        }
    }
}

/// Serves `model` (named `model_id` in the API) with `recipes` until interrupted (SIGINT or
/// SIGTERM); `on_listening` gets the bound address (port 0 picks a free one).
pub fn serve(
    model: Model,
    model_id: String,
    recipes: Vec<(String, Recipe)>,
    options: &ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let served = check_recipes(&model, recipes)?;
    if options.max_rows == 0 || options.queue == 0 {
        bail!("--max-batch and --queue must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let address = format!("{}:{}", options.host, options.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| {
                format!("listening on {address} (is the port in use? pick another with --port)")
            })?;
        on_listening(listener.local_addr()?);
        let app = routes::App::start(model, model_id, served, options);
        let stopping = Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let server = axum::serve(listener, app.router()).with_graceful_shutdown(async move {
            shutdown_signal().await;
            eprintln!("stopping: no new requests; finishing those in flight");
            signalled.notify_one();
        });
        let grace = options.grace;
        tokio::select! {
            served = server => served.context("serving HTTP"),
            _ = async {
                stopping.notified().await;
                tokio::time::sleep(grace).await;
            } => {
                eprintln!("stopping: requests still in flight after {grace:?} are dropped");
                Ok(())
            }
        }
    })
}

/// Each recipe must be made for this model and be named so that `M+NAME` is unambiguous.
fn check_recipes(model: &Model, recipes: Vec<(String, Recipe)>) -> Result<Vec<Served>> {
    let mut served: Vec<Served> = Vec::new();
    for (name, recipe) in recipes {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("recipe name {name:?} must be non-empty letters, digits, '-', '_' or '.' (it becomes part of a model name)");
        }
        if served.iter().any(|s| s.name == name) {
            bail!("two recipes are named {name:?}; give each --recipe NAME=FILE its own name");
        }
        recipe
            .check_model(model)
            .with_context(|| format!("recipe {name:?}"))?;
        served.push(Served { name, recipe });
    }
    Ok(served)
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}

pub use scheduler::Applied;
