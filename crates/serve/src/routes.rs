//! The HTTP side: each handler checks its request into a [`Job`] (rendering the chat template,
//! tokenizing, resolving the steering), queues it for the engine thread, and turns the
//! thread's events into an OpenAI reply, whole or streamed as server-sent events.

use crate::api::{
    top_logprobs, ApiError, ChatRequest, CompletionRequest, PromptField, SteeringField,
};
use crate::metrics::Metrics;
use crate::scheduler::{self, Applied, Choice, Event, Job, Served, TokenLogprob};
use crate::{ServeOptions, MAX_BODY_BYTES};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use refusal_steer_engine::Model;
use refusal_steer_pipeline::answers::encode_with_bos;
use refusal_steer_tokenizer::Message;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

#[derive(Clone)]
pub struct App(Arc<Shared>);

struct Shared {
    model: Arc<Model>,
    model_id: String,
    /// The recipes, shared with the engine thread (requests pick them by index).
    served: Arc<Vec<Served>>,
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    default_max_tokens: usize,
    api_key: Option<String>,
    counter: AtomicU64,
}

impl App {
    /// Starts the engine thread and returns the state the handlers share.
    pub fn start(
        model: Model,
        model_id: String,
        served: Vec<Served>,
        options: &ServeOptions,
    ) -> Self {
        let model = Arc::new(model);
        let served = Arc::new(served);
        let metrics = Arc::new(Metrics::default());
        let (jobs, queue) = std::sync::mpsc::sync_channel(options.queue);
        let (engine_model, engine_served, engine_metrics, max_rows) = (
            model.clone(),
            served.clone(),
            metrics.clone(),
            options.max_rows,
        );
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                scheduler::run(engine_model, engine_served, queue, max_rows, engine_metrics)
            })
            .expect("the engine thread starts");
        App(Arc::new(Shared {
            model,
            model_id,
            served,
            jobs,
            metrics,
            default_max_tokens: options.default_max_tokens,
            api_key: options.api_key.clone(),
            counter: AtomicU64::new(0),
        }))
    }

    pub fn router(self) -> Router {
        let api = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route_layer(middleware::from_fn_with_state(self.clone(), authorise));
        Router::new()
            .merge(api)
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .fallback(|| async {
                ApiError::status(
                    StatusCode::NOT_FOUND,
                    "no such endpoint; this server has /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics",
                )
            })
            .with_state(self)
    }
}

/// With an API key set, `/v1/*` needs `Authorization: Bearer <key>`.
async fn authorise(State(app): State<App>, request: Request, next: Next) -> Response {
    let Some(key) = &app.0.api_key else {
        return next.run(request).await;
    };
    let sent = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent == Some(key.as_str()) {
        next.run(request).await
    } else {
        app.0.metrics.rejected(401);
        ApiError::status(
            StatusCode::UNAUTHORIZED,
            "this server needs an API key: send Authorization: Bearer <key>",
        )
        .into_response()
    }
}

async fn models(State(app): State<App>) -> Json<Value> {
    let s = &app.0;
    let mut data = vec![
        json!({"id": s.model_id, "object": "model", "created": 0, "owned_by": "refusal-steer"}),
    ];
    for served in s.served.iter() {
        data.push(json!({
            "id": format!("{}+{}", s.model_id, served.name),
            "object": "model",
            "created": 0,
            "owned_by": "refusal-steer",
            "steering": {
                "recipe": served.name,
                "gated": served.recipe.gate.is_some(),
                "method": served.recipe.made_by.method,
            },
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.0.metrics.render(),
    )
}

/// The body as JSON, or the 4xx that says why it is not (counted by [`App::answer`]).
fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::status(e.status(), e.body_text()))
}

async fn chat(
    State(app): State<App>,
    request: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let prepared = body(request).and_then(|r| app.prepare_chat(r));
    app.answer(prepared, Kind::Chat).await
}

async fn completions(
    State(app): State<App>,
    request: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let prepared = body(request).and_then(|r| app.prepare_completion(r));
    app.answer(prepared, Kind::Completion).await
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// A checked request: what to queue and how to reply.
struct Prepared {
    job: Job,
    events: UnboundedReceiver<Event>,
    model: String,
    echo: Option<String>,
}

impl App {
    fn prepare_chat(&self, r: ChatRequest) -> Result<Prepared, ApiError> {
        if r.tools.is_some() {
            return Err(ApiError::bad("tools", "tool calls are not supported"));
        }
        let mut messages = Vec::new();
        for m in &r.messages {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad(
                        "messages",
                        format!("role {other:?} is not supported; use system, user or assistant"),
                    ))
                }
            };
            messages.push(Message::new(role, &m.text()?));
        }
        let gate_text = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .ok_or_else(|| ApiError::bad("messages", "messages need at least one user message"))?;
        let text = self.0.model.template.render(&messages, true).map_err(|e| {
            ApiError::bad(
                "messages",
                format!("the chat template cannot render these messages: {e}"),
            )
        })?;
        let prompt = encode_with_bos(&self.0.model, &text);
        let logprobs = match (r.logprobs, r.top_logprobs) {
            (true, k) => Some(top_logprobs(k, "top_logprobs")?),
            (false, Some(_)) => {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ))
            }
            (false, None) => None,
        };
        self.prepare(r.model, &r.common, prompt, gate_text, logprobs, None)
    }

    fn prepare_completion(&self, r: CompletionRequest) -> Result<Prepared, ApiError> {
        let prompt = match r.prompt {
            PromptField::One(p) => p,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(ApiError::bad("prompt", "send one prompt per request"))
            }
        };
        let tokens = encode_with_bos(&self.0.model, &prompt);
        let logprobs = r
            .logprobs
            .map(|k| top_logprobs(Some(k), "logprobs"))
            .transpose()?;
        let echo = r.echo.then(|| prompt.clone());
        self.prepare(r.model, &r.common, tokens, prompt, logprobs, echo)
    }

    fn prepare(
        &self,
        model: Option<String>,
        common: &crate::api::Common,
        prompt: Vec<u32>,
        gate_text: String,
        logprobs: Option<usize>,
        echo: Option<String>,
    ) -> Result<Prepared, ApiError> {
        let decoding = common.decoding()?;
        let steering = self.steering(model.as_deref(), common.steering.as_ref())?;
        if prompt.is_empty() {
            return Err(ApiError::bad("prompt", "the prompt is empty"));
        }
        let context = self.0.model.config.context_length;
        let left = context.saturating_sub(prompt.len());
        let max_tokens = match decoding.max_tokens {
            Some(m) if m <= left => m,
            Some(m) => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!(
                        "the prompt has {} tokens and max_tokens is {m}, but the model's context is {context} tokens; ask for at most {left}",
                        prompt.len()
                    ),
                ))
            }
            None if left > 0 => self.0.default_max_tokens.min(left),
            None => {
                return Err(ApiError::bad(
                    "messages",
                    format!("the prompt has {} tokens, the whole context of {context}", prompt.len()),
                ))
            }
        };
        let seed = decoding
            .seed
            .unwrap_or_else(|| self.0.counter.fetch_add(1, Ordering::Relaxed));
        let (sender, events) = unbounded_channel();
        let model = model.unwrap_or_else(|| self.0.model_id.clone());
        Ok(Prepared {
            job: Job {
                prompt,
                gate_text,
                decoding,
                max_tokens,
                seed,
                steering,
                logprobs,
                events: sender,
                queued: Instant::now(),
            },
            events,
            model,
            echo,
        })
    }

    /// The recipe the model name or the steering field picks; both may name it, but not two.
    fn steering(
        &self,
        model: Option<&str>,
        field: Option<&SteeringField>,
    ) -> Result<Option<Choice>, ApiError> {
        let s = &self.0;
        let by_model = match model {
            None => None,
            Some(m) if m == s.model_id => None,
            Some(m) => match m
                .strip_prefix(s.model_id.as_str())
                .and_then(|rest| rest.strip_prefix('+'))
            {
                Some(name) => Some(self.recipe_index(name, "model")?),
                None => {
                    return Err(ApiError::status(
                        StatusCode::NOT_FOUND,
                        format!(
                        "model {m:?} is not served here; GET /v1/models lists {:?} and {:?}+RECIPE",
                        s.model_id, s.model_id
                    ),
                    ))
                }
            },
        };
        let by_field = field
            .map(|f| self.recipe_index(&f.recipe, "steering"))
            .transpose()?;
        let recipe = match (by_model, by_field) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::bad(
                    "steering",
                    "the model name and the steering field name different recipes; name one",
                ))
            }
            (a, b) => a.or(b),
        };
        let scale = field.and_then(|f| f.scale).unwrap_or(1.0);
        if !scale.is_finite() {
            return Err(ApiError::bad(
                "steering",
                "steering.scale must be a finite number",
            ));
        }
        Ok(recipe.map(|recipe| Choice { recipe, scale }))
    }

    fn recipe_index(&self, name: &str, param: &'static str) -> Result<usize, ApiError> {
        let names: Vec<&str> = self.0.served.iter().map(|s| s.name.as_str()).collect();
        names.iter().position(|n| *n == name).ok_or_else(|| {
            let mut e = ApiError::bad(
                param,
                format!("no recipe named {name:?} is loaded; this server has {names:?}"),
            );
            e.status = StatusCode::NOT_FOUND;
            e
        })
    }

    /// Queues the job and replies with what it produces.
    async fn answer(&self, prepared: Result<Prepared, ApiError>, kind: Kind) -> Response {
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.0.metrics.rejected(e.status.as_u16());
                return e.into_response();
            }
        };
        let Prepared {
            job,
            events,
            model,
            echo,
        } = prepared;
        let (stream, n, prompt_tokens) = (job.decoding.stream, job.decoding.n, job.prompt.len());
        let include_usage = job.decoding.include_usage;
        let logprobs = job.logprobs.is_some();
        // Counted before sending, so the engine never takes a job the gauge has not seen.
        self.0.metrics.queued();
        match self.0.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.0.metrics.dequeued(1);
                self.0.metrics.rejected(429);
                let busy = ApiError::status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the queue is full; retry shortly",
                );
                return ([(header::RETRY_AFTER, "1")], busy).into_response();
            }
            Err(TrySendError::Disconnected(_)) => {
                self.0.metrics.dequeued(1);
                return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
                    .into_response();
            }
        }
        let reply = Reply {
            id: format!(
                "{}-{}",
                if kind == Kind::Chat {
                    "chatcmpl"
                } else {
                    "cmpl"
                },
                self.0.counter.fetch_add(1, Ordering::Relaxed)
            ),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model,
            kind,
            n,
            prompt_tokens,
            logprobs,
            echo,
        };
        if stream {
            Sse::new(reply.stream(events, include_usage)).into_response()
        } else {
            reply.whole(events).await
        }
    }
}

/// What every reply of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    n: usize,
    prompt_tokens: usize,
    logprobs: bool,
    echo: Option<String>,
}

/// One choice as it is being written.
#[derive(Default, Clone)]
struct Written {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    tokens: usize,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn envelope(&self, chunk: bool, steering: &Option<Applied>, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "steering": steering_json(steering),
        })
    }

    /// Collects every event, then answers once.
    async fn whole(self, mut events: UnboundedReceiver<Event>) -> Response {
        let mut steering = None;
        let mut written = vec![Written::default(); self.n];
        while let Some(event) = events.recv().await {
            match event {
                Event::Steering(s) => steering = s,
                Event::Token {
                    choice,
                    text,
                    logprob,
                } => {
                    written[choice].text.push_str(&text);
                    written[choice].logprobs.extend(logprob);
                }
                Event::Done {
                    choice,
                    finish,
                    completion_tokens,
                } => {
                    written[choice].finish = Some(finish);
                    written[choice].tokens = completion_tokens;
                    if written.iter().all(|w| w.finish.is_some()) {
                        break;
                    }
                }
                Event::Failed(message) => {
                    return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, message)
                        .into_response()
                }
            }
        }
        if written.iter().any(|w| w.finish.is_none()) {
            return ApiError::status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the engine stopped mid-answer",
            )
            .into_response();
        }
        let completion_tokens = written.iter().map(|w| w.tokens).sum();
        let choices = written
            .iter()
            .enumerate()
            .map(|(i, w)| self.choice(i, w))
            .collect();
        let mut body = self.envelope(false, &steering, choices);
        body["usage"] = self.usage(completion_tokens);
        Json(body).into_response()
    }

    fn choice(&self, index: usize, w: &Written) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": w.text},
                "logprobs": self.logprobs.then(|| chat_logprobs(&w.logprobs)),
                "finish_reason": w.finish,
            }),
            Kind::Completion => json!({
                "index": index,
                "text": format!("{}{}", self.echo.as_deref().unwrap_or(""), w.text),
                "logprobs": self.logprobs.then(|| completion_logprobs(&w.logprobs)),
                "finish_reason": w.finish,
            }),
        }
    }

    /// Server-sent events: one chunk per token per choice, a last chunk per choice with its
    /// finish reason, the usage if asked, then `[DONE]`.
    fn stream(
        self,
        events: UnboundedReceiver<Event>,
        include_usage: bool,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        struct State {
            reply: Reply,
            events: UnboundedReceiver<Event>,
            steering: Option<Applied>,
            started: Vec<bool>,
            tokens: Vec<Option<usize>>,
            include_usage: bool,
            finished: bool,
        }
        let n = self.n;
        let state = State {
            reply: self,
            events,
            steering: None,
            started: vec![false; n],
            tokens: vec![None; n],
            include_usage,
            finished: false,
        };
        stream::unfold(state, |mut s| async move {
            if s.finished {
                return None;
            }
            loop {
                let Some(event) = s.events.recv().await else {
                    s.finished = true;
                    return Some((vec![sse(json!({"error": {"message": "the engine stopped mid-answer", "type": "server_error"}}))], s));
                };
                let mut out = Vec::new();
                match event {
                    Event::Steering(applied) => {
                        s.steering = applied;
                        continue;
                    }
                    Event::Token { choice, text, logprob } => {
                        let first = !std::mem::replace(&mut s.started[choice], true);
                        out.push(s.reply.chunk(&s.steering, choice, first, &text, logprob.as_ref(), None));
                    }
                    Event::Done { choice, finish, completion_tokens } => {
                        let first = !std::mem::replace(&mut s.started[choice], true);
                        out.push(s.reply.chunk(&s.steering, choice, first, "", None, Some(finish)));
                        s.tokens[choice] = Some(completion_tokens);
                        if s.tokens.iter().all(Option::is_some) {
                            if s.include_usage {
                                let total = s.tokens.iter().flatten().sum();
                                let mut last = s.reply.envelope(true, &s.steering, Vec::new());
                                last["usage"] = s.reply.usage(total);
                                out.push(sse(last));
                            }
                            out.push(SseEvent::default().data("[DONE]"));
                            s.finished = true;
                        }
                    }
                    Event::Failed(message) => {
                        out.push(sse(json!({"error": {"message": message, "type": "server_error"}})));
                        s.finished = true;
                    }
                }
                return Some((out, s));
            }
        })
        .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
    }

    fn chunk(
        &self,
        steering: &Option<Applied>,
        choice: usize,
        first: bool,
        text: &str,
        logprob: Option<&TokenLogprob>,
        finish: Option<&str>,
    ) -> SseEvent {
        let logprobs = logprob.map(|l| match self.kind {
            Kind::Chat => chat_logprobs(std::slice::from_ref(l)),
            Kind::Completion => completion_logprobs(std::slice::from_ref(l)),
        });
        let body = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if finish.is_none() {
                    delta["content"] = json!(text);
                }
                json!({"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                let echo = if first {
                    self.echo.as_deref().unwrap_or("")
                } else {
                    ""
                };
                json!({"index": choice, "text": format!("{echo}{text}"), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        sse(self.envelope(true, steering, vec![body]))
    }
}

fn sse(value: Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

fn steering_json(applied: &Option<Applied>) -> Value {
    match applied {
        None => Value::Null,
        Some(a) => {
            json!({"recipe": a.recipe, "scale": a.scale, "gated": a.gated, "steered": a.steered})
        }
    }
}

/// The chat API's `logprobs.content`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({
                "token": t.token.text,
                "logprob": t.logprob,
                "bytes": t.token.bytes,
                "top_logprobs": t.top.iter().map(|(p, lp)| json!({"token": p.text, "logprob": lp, "bytes": p.bytes})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

/// The legacy completions API's logprobs: parallel lists and one map per token.
fn completion_logprobs(tokens: &[TokenLogprob]) -> Value {
    json!({
        "tokens": tokens.iter().map(|t| &t.token.text).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top.iter().map(|(p, lp)| (p.text.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
    })
}
