//! The OpenAI request bodies this server reads, checked into one [`Ask`] the engine thread
//! runs, and the error body every refusal comes back in.
//!
//! Unknown request fields are ignored, as OpenAI's own server does, so clients that send
//! `frequency_penalty` or `user` work unchanged; a field we read but cannot honour (a `tools`
//! call, `n` over the limit, a logprob count over 20) is a 400 that says so.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

/// A request refused with its status, in OpenAI's error shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": null,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

/// Most choices one request may ask for.
pub const MAX_N: usize = 8;
/// Most alternatives per token, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop sequences, as OpenAI allows.
pub const MAX_STOPS: usize = 4;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: Common,
    /// Return log-probabilities of the chosen tokens.
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub tools: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub common: Common,
    /// The legacy API's count of alternatives per token (0: only the chosen token's).
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API: the engine's penalty on the answer's own tokens (1 is off).
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
    pub steering: Option<SteeringField>,
    /// Not in OpenAI's API (vLLM and llama-server read it): generate all `max_tokens`, past
    /// the end-of-generation token, so load benchmarks compare answers of equal length.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteeringField {
    pub recipe: String,
    pub scale: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// A message's content: a string, or text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl ChatMessage {
    /// The message's text, its parts joined; only text parts are understood.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(ApiError::bad(
                        "messages",
                        format!(
                            "content parts of type {kind:?} are not supported; send text parts"
                        ),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|texts| texts.join("")),
        }
    }
}

/// Decoding settings checked against the limits of this server and model.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Common {
    pub fn decoding(&self) -> Result<Decoding, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::bad(
                    "max_completion_tokens",
                    format!("max_tokens ({b}) and max_completion_tokens ({a}) disagree; send one"),
                ))
            }
            (a, b) => a.or(b),
        };
        if max_tokens == Some(0) {
            return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                "temperature",
                format!("temperature {temperature} is outside [0, 2]"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                "top_p",
                format!("top_p {top_p} is outside (0, 1]"),
            ));
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ApiError::bad(
                "repetition_penalty",
                format!("repetition_penalty {repetition_penalty} must be positive (1 is off)"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad(
                "stop",
                format!("stop takes up to {MAX_STOPS} non-empty strings"),
            ));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::bad(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        Ok(Decoding {
            max_tokens,
            temperature,
            top_p,
            repetition_penalty,
            seed: self.seed,
            stop,
            n,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos,
        })
    }
}

/// A top-logprob count checked against the limit.
pub fn top_logprobs(count: Option<usize>, param: &'static str) -> Result<usize, ApiError> {
    match count.unwrap_or(0) {
        n if n <= MAX_TOP_LOGPROBS => Ok(n),
        n => Err(ApiError::bad(
            param,
            format!("{param} must be at most {MAX_TOP_LOGPROBS}, got {n}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(body: serde_json::Value) -> Result<Decoding, ApiError> {
        serde_json::from_value::<Common>(body).unwrap().decoding()
    }

    #[test]
    fn defaults_are_openais() {
        let d = common(json!({})).unwrap();
        assert_eq!(
            (d.temperature, d.top_p, d.n, d.max_tokens),
            (1.0, 1.0, 1, None)
        );
        assert!(d.stop.is_empty() && !d.stream && !d.ignore_eos);
        let d = common(
            json!({"stop": "\n", "max_completion_tokens": 5, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(
            (d.stop, d.max_tokens, d.include_usage),
            (vec!["\n".to_string()], Some(5), true)
        );
    }

    #[test]
    fn out_of_range_fields_name_themselves() {
        for (body, param) in [
            (json!({"temperature": 3.0}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"n": 9}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_tokens": 3, "max_completion_tokens": 4}),
                "max_completion_tokens",
            ),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": [""]}), "stop"),
            (json!({"repetition_penalty": -1.0}), "repetition_penalty"),
        ] {
            let err = common(body.clone()).unwrap_err();
            assert_eq!(
                (err.status, err.param),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{body}"
            );
        }
        assert_eq!(
            top_logprobs(Some(21), "top_logprobs").unwrap_err().param,
            Some("top_logprobs")
        );
    }

    #[test]
    fn content_parts_join_and_images_are_refused() {
        let message: ChatMessage = serde_json::from_value(json!({"role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}))
        .unwrap();
        assert_eq!(message.text().unwrap(), "ab");
        let image: ChatMessage = serde_json::from_value(json!({"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}]}))
        .unwrap();
        assert!(image.text().unwrap_err().message.contains("image_url"));
    }
}
