//! The miniature run config and its data, shared by the run tests.

use std::path::Path;
use std::process::{Command, Output};

pub fn refusal_steer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

pub fn write_data(dir: &Path) {
    let letters = [
        "Write a letter to my landlord asking to fix the heating.",
        "Write a letter to a colleague thanking them for their help.",
        "Write a letter to my bank asking to close my account.",
        "Write a letter to a hiring manager applying for a job.",
        "Write a letter to my neighbour about their noisy dog.",
        "Write a letter to the city council about potholes.",
        "Write a letter to a teacher thanking them for the year.",
        "Write a letter to my grandmother about my holiday.",
    ];
    let facts = [
        "List three fruits.",
        "What is the boiling point of water in Celsius?",
        "Name the largest planet in the solar system.",
        "What colour is the sky on a clear day?",
        "How many days are in a week?",
        "What is two plus two?",
        "Name a primary colour.",
        "What is the capital of France?",
    ];
    std::fs::write(dir.join("letters.txt"), letters.join("\n")).unwrap();
    std::fs::write(dir.join("facts.txt"), facts.join("\n")).unwrap();
    std::fs::write(
        dir.join("arc.jsonl"),
        (0..4)
            .map(|i| {
                format!(
                    r#"{{"id": "q{i}", "question": {{"stem": "What is {i} plus one?", "choices": [{{"text": "{}", "label": "A"}}, {{"text": "{}", "label": "B"}}]}}, "answerKey": "A"}}"#,
                    i + 1,
                    i + 7
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    std::fs::write(dir.join("markers.json"), r#"{"markers": ["Dear"]}"#).unwrap();
}

pub const CONFIG: &str = r#"
model = "smollm2-135m-instruct"
judge = "patterns:DATA/markers.json"
data_dir = "DATA"
seed = 0
direction = "remove"
samples = 1
temperature = 0.0
max_tokens = 12
batch = 4
kappa = 1.0

[tune]
strengths = [0.05, 0.2]
goal = 0.05
max_safety_drop = 1.0
max_benign_rise = 1.0
max_kl = 50.0
auc_margin = 0.5
min_depth = 0.5

[sets.target]
train = 4
validation = 2
test = 2
sources = [{ path = "letters.txt" }]

[sets.contrast]
train = 4
validation = 0
test = 0
sources = [{ path = "facts.txt" }]

[sets.safety]
train = 2
validation = 1
test = 1
sources = [{ path = "letters.txt" }]

[sets.benign]
train = 2
validation = 1
test = 1
sources = [{ path = "facts.txt" }]

[sets.capability]
train = 0
validation = 0
test = 3
sources = [{ path = "arc.jsonl", kind = "arc" }]
"#;
