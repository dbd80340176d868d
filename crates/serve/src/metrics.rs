//! What `/metrics` reports, in Prometheus' text format: requests (per recipe), failures,
//! queue depth, generated tokens and the time they took, the time spent on topic gates and on
//! prompts, and time to first token.

use crate::scheduler::Applied;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Requests run, by recipe ("" for none) and whether steering was applied.
    requests: BTreeMap<(String, bool), u64>,
    rejected: BTreeMap<u16, u64>,
    failed: u64,
    queued: u64,
    generated_tokens: u64,
    generation_seconds: f64,
    gate_seconds: f64,
    prefill_seconds: f64,
    first_token_seconds: f64,
    first_tokens: u64,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counts)) {
        // A panic elsewhere cannot leave counters half-updated, so a poisoned lock is fine.
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn queued(&self) {
        self.with(|c| c.queued += 1);
    }

    pub fn dequeued(&self, n: usize) {
        self.with(|c| c.queued = c.queued.saturating_sub(n as u64));
    }

    pub fn rejected(&self, status: u16) {
        self.with(|c| *c.rejected.entry(status).or_default() += 1);
    }

    pub fn request(&self, applied: Option<&Applied>) {
        let key = applied.map_or((String::new(), false), |a| (a.recipe.clone(), a.steered));
        self.with(|c| *c.requests.entry(key).or_default() += 1);
    }

    pub fn failed(&self) {
        self.with(|c| c.failed += 1);
    }

    pub fn first_token(&self, after: Duration) {
        self.with(|c| {
            c.first_tokens += 1;
            c.first_token_seconds += after.as_secs_f64();
        });
    }

    pub fn generated(&self, tokens: usize, took: Duration) {
        self.with(|c| {
            c.generated_tokens += tokens as u64;
            c.generation_seconds += took.as_secs_f64();
        });
    }

    /// Time spent letting newcomers in: their gates' reads and their prompts' prefill.
    pub fn admitted(&self, gate: Duration, prefill: Duration) {
        self.with(|c| {
            c.gate_seconds += gate.as_secs_f64();
            c.prefill_seconds += prefill.as_secs_f64();
        });
    }

    pub fn render(&self) -> String {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP refusal_steer_{name} {help}");
            let _ = writeln!(out, "# TYPE refusal_steer_{name} {kind}");
        };
        header(
            &mut out,
            "requests_total",
            "counter",
            "Requests run, by recipe and whether it steered them.",
        );
        for ((recipe, steered), n) in &c.requests {
            let _ = writeln!(
                out,
                "refusal_steer_requests_total{{recipe=\"{recipe}\",steered=\"{steered}\"}} {n}"
            );
        }
        header(
            &mut out,
            "rejected_total",
            "counter",
            "Requests refused before running, by HTTP status.",
        );
        for (status, n) in &c.rejected {
            let _ = writeln!(
                out,
                "refusal_steer_rejected_total{{status=\"{status}\"}} {n}"
            );
        }
        let scalars = [
            (
                "failed_total",
                "counter",
                "Requests whose generation failed.",
                c.failed as f64,
            ),
            (
                "queue_depth",
                "gauge",
                "Requests waiting for the engine.",
                c.queued as f64,
            ),
            (
                "generated_tokens_total",
                "counter",
                "Tokens generated.",
                c.generated_tokens as f64,
            ),
            (
                "generation_seconds_total",
                "counter",
                "Seconds spent generating batches.",
                c.generation_seconds,
            ),
            (
                "gate_seconds_total",
                "counter",
                "Seconds spent reading prompts for the topic gates of gated recipes.",
                c.gate_seconds,
            ),
            (
                "prefill_seconds_total",
                "counter",
                "Seconds spent running the prompts of joining requests.",
                c.prefill_seconds,
            ),
            (
                "time_to_first_token_seconds_sum",
                "counter",
                "Seconds from queueing to each request's first token, summed.",
                c.first_token_seconds,
            ),
            (
                "time_to_first_token_seconds_count",
                "counter",
                "Requests that got a first token.",
                c.first_tokens as f64,
            ),
        ];
        for (name, kind, help, value) in scalars {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "refusal_steer_{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_as_prometheus_text() {
        let m = Metrics::default();
        m.queued();
        m.queued();
        m.dequeued(1);
        m.rejected(400);
        m.request(None);
        let applied = Applied {
            recipe: "r".into(),
            scale: 1.0,
            gated: true,
            steered: false,
        };
        m.request(Some(&applied));
        m.generated(10, Duration::from_secs(2));
        m.admitted(Duration::from_millis(500), Duration::from_secs(1));
        let text = m.render();
        for line in [
            "refusal_steer_requests_total{recipe=\"\",steered=\"false\"} 1",
            "refusal_steer_requests_total{recipe=\"r\",steered=\"false\"} 1",
            "refusal_steer_rejected_total{status=\"400\"} 1",
            "refusal_steer_queue_depth 1",
            "refusal_steer_generated_tokens_total 10",
            "refusal_steer_generation_seconds_total 2",
            "refusal_steer_gate_seconds_total 0.5",
            "refusal_steer_prefill_seconds_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
