//! The remote judge against a real HTTP server on loopback that speaks just enough of the
//! OpenAI chat completions API: verdicts from logprobs, retries after 5xx, timeouts, the
//! missing-logprobs error, sampled replies and bounded concurrency.

use refusal_steer_judge::local::JudgePrompt;
use refusal_steer_judge::{Judge, RemoteConfig, RemoteJudge, Scoring};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server does with the n-th request (0-based) and its JSON body.
type Script = dyn Fn(usize, &Value) -> Reply + Send + Sync;

enum Reply {
    Json(Value),
    Status(u16, &'static str),
    /// Never answer (the client must time out).
    Hang,
}

struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
    in_flight_peak: Arc<AtomicUsize>,
    auth: Arc<Mutex<Vec<Option<String>>>>,
}

/// Serves `script` on 127.0.0.1, one thread per connection, until the test process ends.
fn serve(script: Arc<Script>, delay: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let in_flight_peak = Arc::new(AtomicUsize::new(0));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let server = Server {
        url,
        requests: requests.clone(),
        in_flight_peak: in_flight_peak.clone(),
        auth: auth.clone(),
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (script, requests, in_flight, peak, auth) = (
                script.clone(),
                requests.clone(),
                in_flight.clone(),
                in_flight_peak.clone(),
                auth.clone(),
            );
            std::thread::spawn(move || {
                let counters = Counters {
                    requests: &requests,
                    in_flight: &in_flight,
                    peak: &peak,
                    auth: &auth,
                };
                handle(stream, &*script, counters, delay);
            });
        }
    });
    server
}

struct Counters<'a> {
    requests: &'a AtomicUsize,
    in_flight: &'a AtomicUsize,
    peak: &'a AtomicUsize,
    auth: &'a Mutex<Vec<Option<String>>>,
}

fn handle(stream: TcpStream, script: &Script, counters: Counters, delay: Duration) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    let mut authorization = None;
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    assert!(
        request_line.starts_with("POST /v1/chat/completions "),
        "{request_line}"
    );
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap(),
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    counters.auth.lock().unwrap().push(authorization);
    // A request is in flight from its arrival until its reply is written: counting past the
    // write would overlap with the client's next request on the same worker.
    let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counters.peak.fetch_max(now, Ordering::SeqCst);
    let n = counters.requests.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(delay);
    let reply = script(n, &body);
    counters.in_flight.fetch_sub(1, Ordering::SeqCst);
    let (status, text) = match reply {
        Reply::Json(value) => (200, value.to_string()),
        Reply::Status(code, text) => (code, text.to_string()),
        Reply::Hang => {
            std::thread::sleep(Duration::from_secs(5));
            return;
        }
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

/// A reply "Verdict: <label>" whose verdict token has `p_refusal` of the label mass (and
/// some mass on an unrelated token).
fn logprob_reply(p_refusal: f64) -> Value {
    let top = |token: &str| json!([{"token": token, "logprob": 0.0}]);
    json!({
        "choices": [{
            "message": {"role": "assistant", "content": "Verdict: refusal"},
            "logprobs": {"content": [
                {"token": "Verdict", "logprob": 0.0, "top_logprobs": top("Verdict")},
                {"token": ":", "logprob": 0.0, "top_logprobs": top(":")},
                {"token": " refusal", "logprob": -0.1, "top_logprobs": [
                    {"token": " refusal", "logprob": (0.9 * p_refusal).ln()},
                    {"token": " not", "logprob": (0.9 * (1.0 - p_refusal)).ln()},
                    {"token": " maybe", "logprob": (0.1f64).ln()},
                ]},
            ]},
        }]
    })
}

/// The p_refusal the server gives an answer: in its text after "p=".
fn p_of(body: &Value) -> f64 {
    let content = body["messages"][0]["content"].as_str().unwrap();
    let at = content.find("p=").unwrap() + 2;
    content[at..at + 3].parse().unwrap()
}

fn config(url: &str) -> RemoteConfig {
    let mut config = RemoteConfig::new(url, "judge-model");
    config.backoff = Duration::from_millis(10);
    config.timeout = Duration::from_secs(5);
    config.api_key = Some("secret".into());
    config
}

fn judge(config: RemoteConfig, scoring: Scoring) -> RemoteJudge {
    RemoteJudge::new(config, JudgePrompt::default(), scoring, 0.5).unwrap()
}

#[test]
fn verdicts_come_from_the_label_mass_and_5xx_is_retried() {
    // The first request fails with 500, the second with 429; then all is well.
    let server = serve(
        Arc::new(|n, body: &Value| {
            assert_eq!(body["model"], "judge-model");
            assert_eq!(body["logprobs"], true);
            assert_eq!(body["top_logprobs"], 20);
            match n {
                0 => Reply::Status(500, r#"{"error": "warming up"}"#),
                1 => Reply::Status(429, r#"{"error": "slow down"}"#),
                _ => Reply::Json(logprob_reply(p_of(body))),
            }
        }),
        Duration::ZERO,
    );
    let mut config = config(&server.url);
    config.concurrency = 1;
    let mut judge = judge(config, Scoring::VerdictProb);
    let verdicts = judge
        .judge(&[("q1", "p=0.8"), ("q2", "p=0.1"), ("q3", "p=0.5")])
        .unwrap();
    let p: Vec<f64> = verdicts.iter().map(|v| v.p_refusal.unwrap()).collect();
    assert!(
        (p[0] - 0.8).abs() < 1e-9 && (p[1] - 0.1).abs() < 1e-9,
        "{p:?}"
    );
    let labels: Vec<i8> = verdicts.iter().map(|v| v.label).collect();
    assert_eq!(labels[..2], [1, -1]);
    assert_eq!(server.requests.load(Ordering::SeqCst), 5);
    assert!(server
        .auth
        .lock()
        .unwrap()
        .iter()
        .all(|a| a.as_deref() == Some("Bearer secret")));
    assert!(judge.id().starts_with("remote:judge-model#"));
    assert_eq!(judge.mode(), "verdict-prob");
}

#[test]
fn requests_run_concurrently_up_to_the_limit_and_keep_their_order() {
    let server = serve(
        Arc::new(|_, body: &Value| Reply::Json(logprob_reply(p_of(body)))),
        Duration::from_millis(100),
    );
    let mut config = config(&server.url);
    config.concurrency = 3;
    let answers: Vec<String> = (0..9).map(|i| format!("p=0.{i}")).collect();
    let items: Vec<(&str, &str)> = answers.iter().map(|a| ("q", a.as_str())).collect();
    let verdicts = judge(config, Scoring::VerdictProb).judge(&items).unwrap();
    for (i, v) in verdicts.iter().enumerate() {
        assert!((v.p_refusal.unwrap() - i as f64 / 10.0).abs() < 1e-9);
    }
    // Never more than the limit at once, and more than one (a loaded machine may not start
    // all three workers within the server's 100 ms).
    let peak = server.in_flight_peak.load(Ordering::SeqCst);
    assert!((2..=3).contains(&peak), "peak of {peak} requests in flight");
}

#[test]
fn a_server_without_logprobs_is_explained() {
    let server = serve(
        Arc::new(|_, _: &Value| {
            Reply::Json(json!({"choices": [{"message": {"content": "Verdict: refusal"}}]}))
        }),
        Duration::ZERO,
    );
    let err = judge(config(&server.url), Scoring::VerdictProb)
        .judge(&[("q", "a")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no logprobs") && err.contains("--mode sampled"),
        "{err}"
    );
}

#[test]
fn timeouts_and_persistent_5xx_give_up_after_the_retries() {
    let server = serve(Arc::new(|_, _: &Value| Reply::Hang), Duration::ZERO);
    let mut hanging = config(&server.url);
    hanging.timeout = Duration::from_millis(200);
    hanging.retries = 1;
    let err = judge(hanging, Scoring::VerdictProb)
        .judge(&[("q", "a")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);

    let server = serve(
        Arc::new(|_, _: &Value| Reply::Status(503, "overloaded")),
        Duration::ZERO,
    );
    let mut config = config(&server.url);
    config.retries = 2;
    let err = judge(config, Scoring::VerdictProb)
        .judge(&[("q", "a")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 503: overloaded") && err.contains("3 attempts"),
        "{err}"
    );
}

#[test]
fn client_errors_fail_at_once_with_a_hint() {
    let server = serve(
        Arc::new(|_, _: &Value| Reply::Status(401, r#"{"error": "bad key"}"#)),
        Duration::ZERO,
    );
    let err = judge(config(&server.url), Scoring::VerdictProb)
        .judge(&[("q", "a")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("REFUSAL_STEER_JUDGE_API_KEY"),
        "{err}"
    );
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn sampled_replies_are_parsed_as_the_paper_does() {
    let server = serve(
        Arc::new(|_, body: &Value| {
            assert_eq!(body["max_tokens"], 64);
            assert!(body.get("logprobs").is_none());
            let content = body["messages"][0]["content"].as_str().unwrap();
            let reply = if content.contains("sorry") {
                "It declines. <answer>refusal</answer>"
            } else if content.contains("recipe") {
                "It answers. <answer>refusal</answer> No: <answer>not refusal</answer>"
            } else {
                "I am not sure."
            };
            Reply::Json(json!({"choices": [{"message": {"content": reply}}]}))
        }),
        Duration::ZERO,
    );
    let mut judge = judge(config(&server.url), Scoring::Sampled { max_tokens: 64 });
    let labels: Vec<i8> = judge
        .judge(&[("q", "sorry, no"), ("q", "the recipe: flour"), ("q", "hmm")])
        .unwrap()
        .iter()
        .map(|v| v.label)
        .collect();
    assert_eq!(labels, vec![1, -1, 0]);
    assert_eq!(judge.mode(), "sampled");
}

#[test]
fn bad_setups_are_refused_before_any_request() {
    let prompt = JudgePrompt::default;
    let bad_url = RemoteConfig::new("host:8000/v1", "m");
    let err = RemoteJudge::new(bad_url, prompt(), Scoring::VerdictProb, 0.5)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("http://host:8000/v1"), "{err}");
    let mut none = RemoteConfig::new("http://h/v1", "m");
    none.concurrency = 0;
    assert!(RemoteJudge::new(none, prompt(), Scoring::VerdictProb, 0.5).is_err());
    let no_model = RemoteConfig::new("http://h/v1", "");
    assert!(RemoteJudge::new(no_model, prompt(), Scoring::VerdictProb, 0.5).is_err());
}
