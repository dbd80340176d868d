//! The server against the library on the tiny model: the same answers as `Generator` (with and
//! without a recipe, gated or not, alone or in a batch), streaming equal to the whole reply,
//! stop strings, log-probabilities, and bad requests answered 4xx while it keeps serving.

use refusal_steer_engine::{tiny, Model};
use refusal_steer_pipeline::gate::{Gate, GateMethod, Readout};
use refusal_steer_pipeline::recipe::{ModelIdentity, Provenance};
use refusal_steer_pipeline::steering::{SteerMode, SteerPositions, Steering};
use refusal_steer_pipeline::{Generator, Recipe};
use refusal_steer_serve::{serve, ServeOptions};
use refusal_steer_steer::SteeringVectors;
use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::sync::OnceLock;

const MAX_TOKENS: usize = 8;
const PROMPTS: [&str; 4] = ["the cat sat", "in an hour there", "a", "dogs and cats"];

struct Fixture {
    url: String,
    model: Model,
    steer: Recipe,
    gated: Recipe,
    _dir: tempfile::TempDir,
}

/// A recipe adding a fixed pseudo-random vector at points 1 and 2; gated by a gate that lets
/// some prompts through and holds others back.
fn recipe(model: &Model, gated: bool) -> Recipe {
    let (n_points, d) = (model.config.n_layers + 1, model.config.d_model);
    let values: Vec<f32> = (0..n_points * d)
        .map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * 4.0)
        .collect();
    let vectors = SteeringVectors::new(values, n_points, d, Default::default()).unwrap();
    let direction: Vec<f32> = (0..d)
        .map(|i| if i % 3 == 0 { 0.5 } else { -0.25 })
        .collect();
    let norm = direction.iter().map(|x| x * x).sum::<f32>().sqrt();
    let gate = Gate {
        method: GateMethod::Md,
        points: vec![2],
        topic: Readout {
            weights: direction.iter().map(|x| x / norm).collect(),
            threshold: -0.75,
        },
        veto: None,
        cuts: None,
        heldout_auc: 0.5,
        heldout_accuracy: 0.5,
        read: Default::default(),
    };
    let mut alphas = vec![0.0; n_points];
    alphas[1] = 1.0;
    alphas[2] = -2.0;
    Recipe::from_steering(
        &ModelIdentity::of(model).unwrap(),
        &Steering {
            vectors: &vectors,
            points: &[1, 2],
            alphas: &alphas,
            mode: SteerMode::Add,
            positions: SteerPositions::All,
            ablate_with: &[],
        },
        gated.then_some(&gate),
        Provenance {
            method: "test".into(),
            source: "serve tests".into(),
            ..Default::default()
        },
    )
    .unwrap()
}

/// One server for every test (it runs until the test process ends).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        tiny::write(&path).unwrap();
        let load = || Model::load(&path).unwrap();
        let model = load();
        let (steer, gated) = (recipe(&model, false), recipe(&model, true));
        let recipes = vec![
            ("steer".to_string(), steer.clone()),
            ("gated".to_string(), gated.clone()),
        ];
        let options = ServeOptions {
            port: 0,
            max_rows: 8,
            ..ServeOptions::default()
        };
        Fixture {
            url: start(load(), recipes, options),
            model,
            steer,
            gated,
            _dir: dir,
        }
    })
}

/// Starts a server on a free port; it runs until the test process ends.
fn start(model: Model, recipes: Vec<(String, Recipe)>, options: ServeOptions) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        serve(model, "tiny".into(), recipes, &options, |address| {
            tx.send(address).unwrap()
        })
        .unwrap();
    });
    format!("http://{}", rx.recv().unwrap())
}

/// Posts `body` and returns (status, JSON body).
fn post(path: &str, body: &Value) -> (u16, Value) {
    let url = format!("{}{path}", fixture().url);
    let response = match send(&url, body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = response.status();
    (
        status,
        serde_json::from_str(&response.into_string().unwrap()).unwrap(),
    )
}

// ureq's own error type, as its callers match on it.
#[allow(clippy::result_large_err)]
fn send(url: &str, body: &Value) -> Result<ureq::Response, ureq::Error> {
    ureq::post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
}

fn get(path: &str) -> (u16, String) {
    let r = ureq::get(&format!("{}{path}", fixture().url))
        .call()
        .unwrap();
    (r.status(), r.into_string().unwrap())
}

/// What the library answers, greedily, to each prompt.
fn expected(recipe: Option<&Recipe>, prompts: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut generator = Generator::new(&f.model);
    generator.options.max_new_tokens = MAX_TOKENS;
    if let Some(r) = recipe {
        generator = generator.with_recipe(r).unwrap();
    }
    generator.answer(prompts).unwrap()
}

fn chat(model: &str, prompt: &str, extra: Value) -> (u16, Value) {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    post("/v1/chat/completions", &body)
}

fn content(reply: &Value) -> String {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn answers_equal_the_library_unsteered_and_under_each_recipe() {
    let f = fixture();
    for (model, recipe) in [("tiny", None), ("tiny+steer", Some(&f.steer))] {
        let want = expected(recipe, &PROMPTS);
        for (prompt, want) in PROMPTS.iter().zip(&want) {
            let (status, reply) = chat(model, prompt, json!({}));
            assert_eq!(status, 200, "{reply}");
            assert_eq!(&content(&reply), want, "{model}: {prompt}");
            let usage = &reply["usage"];
            assert_eq!(
                usage["total_tokens"].as_u64(),
                Some(
                    usage["prompt_tokens"].as_u64().unwrap()
                        + usage["completion_tokens"].as_u64().unwrap()
                )
            );
        }
    }
    // The steering field picks the same recipe as the model name.
    let (_, by_field) = chat("tiny", PROMPTS[0], json!({"steering": {"recipe": "steer"}}));
    assert_eq!(
        content(&by_field),
        expected(Some(&f.steer), &PROMPTS[..1])[0]
    );
    assert_eq!(
        by_field["steering"],
        json!({"recipe": "steer", "scale": 1.0, "gated": false, "steered": true})
    );
    // Scale 0 is the unsteered model.
    let (_, zero) = chat(
        "tiny+steer",
        PROMPTS[0],
        json!({"steering": {"recipe": "steer", "scale": 0.0}}),
    );
    assert_eq!(content(&zero), expected(None, &PROMPTS[..1])[0]);
}

#[test]
fn ignore_eos_writes_the_whole_budget() {
    let budget = 24;
    // A sampled answer the model ends on its own before the budget.
    let (sampling, ended) = (0..32)
        .map(|seed| json!({"max_tokens": budget, "temperature": 1.0, "seed": seed}))
        .map(|sampling| (sampling.clone(), chat("tiny", PROMPTS[0], sampling).1))
        .find(|(_, reply)| reply["choices"][0]["finish_reason"] == "stop")
        .expect("the tiny model ends some sampled answer before 24 tokens");
    let mut ignoring = sampling.clone();
    ignoring["ignore_eos"] = json!(true);
    let (status, full) = chat("tiny", PROMPTS[0], ignoring);
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    assert_eq!(full["usage"]["completion_tokens"], json!(budget));
    assert!(
        content(&full).starts_with(&content(&ended)),
        "{full}\n{ended}"
    );
}

#[test]
fn a_gated_recipe_steers_only_what_its_gate_lets_through_and_says_so() {
    let f = fixture();
    let passes = f
        .gated
        .steered(
            &f.model,
            &Default::default(),
            None,
            &PROMPTS.map(String::from),
            4,
        )
        .unwrap();
    assert!(
        passes.contains(&true) && passes.contains(&false),
        "{passes:?}: pick another gate"
    );
    let want = expected(Some(&f.gated), &PROMPTS);
    for ((prompt, want), pass) in PROMPTS.iter().zip(&want).zip(&passes) {
        let (_, reply) = chat("tiny+gated", prompt, json!({}));
        assert_eq!(&content(&reply), want, "{prompt}");
        assert_eq!(reply["steering"]["gated"], json!(true));
        assert_eq!(reply["steering"]["steered"], json!(pass), "{prompt}");
    }
}

#[test]
fn concurrent_requests_with_different_recipes_answer_as_alone() {
    let f = fixture();
    let cases: Vec<(&str, Option<&Recipe>, &str)> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| match i % 3 {
            0 => ("tiny", None, *p),
            1 => ("tiny+steer", Some(&f.steer), *p),
            _ => ("tiny+gated", Some(&f.gated), *p),
        })
        .collect();
    let want: Vec<String> = cases
        .iter()
        .map(|(_, r, p)| expected(*r, &[p]).remove(0))
        .collect();
    let got: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(m, _, p)| s.spawn(move || content(&chat(m, p, json!({})).1)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
}

#[test]
fn streaming_sends_the_same_text_in_chunks_then_done() {
    let url = format!("{}/v1/chat/completions", fixture().url);
    let body = json!({
        "model": "tiny+steer",
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut text = String::new();
    send(&url, &body)
        .unwrap()
        .into_reader()
        .read_to_string(&mut text)
        .unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(
        streamed,
        expected(Some(&fixture().steer), &PROMPTS[1..2])[0]
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let last = chunks.last().unwrap();
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|c| &c["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
}

#[test]
fn stop_strings_cut_the_answer_and_logprobs_come_with_alternatives() {
    let want = expected(None, &PROMPTS[..1]).remove(0);
    let cut = want.char_indices().nth(want.chars().count() / 2).unwrap().0;
    let stop = &want[cut..(cut + want[cut..].chars().next().unwrap().len_utf8())];
    let (_, reply) = chat("tiny", PROMPTS[0], json!({"stop": stop}));
    assert_eq!(content(&reply), want[..want.find(stop).unwrap()]);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");

    let (_, reply) = chat(
        "tiny",
        PROMPTS[0],
        json!({"logprobs": true, "top_logprobs": 3}),
    );
    let tokens = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        tokens.len() as u64,
        reply["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in &tokens {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert!(
            (top[0]["logprob"].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs() < 1e-5,
            "{t}"
        );
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }

    // The legacy completions endpoint, raw prompt, two choices.
    let (status, reply) = post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "the cat", "max_tokens": 4, "n": 2, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        choices[0]["text"], choices[1]["text"],
        "greedy choices agree"
    );
    assert_eq!(reply["object"], "text_completion");
    assert_eq!(
        choices[0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn models_health_and_metrics_describe_the_server() {
    let (status, body) = get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "tiny+steer", "tiny+gated"]);
    assert_eq!(models["data"][2]["steering"]["gated"], json!(true));
    assert_eq!(get("/health").0, 200);
    chat("tiny", "a", json!({}));
    let (status, metrics) = get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("refusal_steer_requests_total{recipe=\"\",steered=\"false\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("refusal_steer_generated_tokens_total"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_4xx_with_the_reason_and_the_server_keeps_serving() {
    let url = format!("{}/v1/chat/completions", fixture().url);
    let raw = match ureq::post(&url)
        .set("Content-Type", "application/json")
        .send_string("{not json")
    {
        Err(ureq::Error::Status(code, _)) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(raw, 400);
    let long = "word ".repeat(400);
    for (body, status, says) in [
        (
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "not served here",
        ),
        (
            json!({"model": "tiny+nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "no recipe named",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 9}),
            400,
            "n must be",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "hi"}]}),
            400,
            "role",
        ),
        (
            json!({"messages": [{"role": "system", "content": "hi"}]}),
            400,
            "user message",
        ),
        (
            json!({"messages": [{"role": "user", "content": long}], "max_tokens": 100}),
            400,
            "context",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            400,
            "logprobs: true",
        ),
        (
            json!({"model": "tiny+steer", "messages": [{"role": "user", "content": "hi"}], "steering": {"recipe": "gated"}}),
            400,
            "different recipes",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "steering": {"recipe": "steer", "path": "/etc/passwd"}}),
            422,
            "unknown field",
        ),
        (json!({"messages": "hi"}), 422, "messages"),
    ] {
        let (got, reply) = post("/v1/chat/completions", &body);
        assert_eq!(got, status, "{body} -> {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body} -> {message}");
    }
    // A body over the limit is refused (the server may answer before it has read it all).
    let address = fixture().url.trim_start_matches("http://").to_string();
    let stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let body = format!(
            r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
            "x".repeat(2 << 20)
        );
        let _ = write!(
            writer,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    let mut status_line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut status_line)
        .unwrap();
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    assert_eq!(
        ureq::get(&format!("{}/v1/nothing", fixture().url))
            .call()
            .unwrap_err()
            .into_response()
            .map(|r| r.status()),
        Some(404)
    );
    let (status, reply) = chat("tiny", "still here?", json!({}));
    assert_eq!(status, 200, "{reply}");
}

#[test]
fn an_api_key_guards_the_api_but_not_health() {
    let f = fixture();
    let options = ServeOptions {
        port: 0,
        api_key: Some("sesame".into()),
        ..ServeOptions::default()
    };
    let url = start(Model::load(&f.model.path).unwrap(), Vec::new(), options);
    let models = |key: Option<&str>| {
        let mut request = ureq::get(&format!("{url}/v1/models"));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        (models(None), models(Some("wrong")), models(Some("sesame"))),
        (401, 401, 200)
    );
    assert_eq!(
        ureq::get(&format!("{url}/health")).call().unwrap().status(),
        200
    );
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_the_rest_are_served() {
    let f = fixture();
    let options = ServeOptions {
        port: 0,
        max_rows: 1,
        queue: 1,
        ..ServeOptions::default()
    };
    let url = start(Model::load(&f.model.path).unwrap(), Vec::new(), options);
    let body = json!({"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "temperature": 0});
    let outcomes: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (url, body) = (&url, &body);
                s.spawn(
                    move || match send(&format!("{url}/v1/chat/completions"), body) {
                        Ok(r) => (r.status(), None),
                        Err(ureq::Error::Status(code, r)) => {
                            (code, r.header("Retry-After").map(String::from))
                        }
                        Err(e) => panic!("{e}"),
                    },
                )
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<_> = outcomes.iter().filter(|(code, _)| *code == 429).collect();
    assert!(!busy.is_empty(), "{outcomes:?}");
    assert!(
        busy.iter().all(|(_, retry)| retry.as_deref() == Some("1")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().all(|(code, _)| matches!(code, 200 | 429)),
        "{outcomes:?}"
    );
}
