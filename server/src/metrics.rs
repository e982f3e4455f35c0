//! Serving metrics, updated lock-free by the scheduler and the HTTP handlers, rendered in the
//! Prometheus text exposition format for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (Prometheus `le` buckets).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths, so it fits an atomic integer.
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro.fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Observations above `bound` (for tests and logs).
    pub fn count_above(&self, bound: f64) -> u64 {
        let at_most: u64 = self.bounds.iter().zip(&self.counts).filter(|(b, _)| **b <= bound).map(|(_, c)| c.load(Ordering::Relaxed)).sum();
        self.count() - at_most
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

const STEP_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const BATCH_TOKENS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
const REQUEST_SECONDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

pub struct Metrics {
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub requests_finished: [AtomicU64; 4],
    pub requests_rejected: [AtomicU64; 4],
    pub adapter_slots_used: AtomicU64,
    pub adapter_slots_total: AtomicU64,
    pub adapters_registered: AtomicU64,
    pub kv_pages_used: AtomicU64,
    pub kv_pages_total: AtomicU64,
    pub preemptions: AtomicU64,
    pub step_seconds: Histogram,
    pub batch_rows: Histogram,
    pub batch_tokens: Histogram,
    pub request_seconds: Histogram,
}

/// Why a request ended (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stop = 0,
    Length = 1,
    Cancelled = 2,
    Error = 3,
}

/// Why a request was turned away before queueing (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    QueueFull = 0,
    Unavailable = 1,
    NotFound = 2,
    Invalid = 3,
}

const OUTCOMES: [&str; 4] = ["stop", "length", "cancelled", "error"];
const REJECTIONS: [&str; 4] = ["queue_full", "unavailable", "not_found", "invalid"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            requests_finished: Default::default(),
            requests_rejected: Default::default(),
            adapter_slots_used: AtomicU64::new(0),
            adapter_slots_total: AtomicU64::new(0),
            adapters_registered: AtomicU64::new(0),
            kv_pages_used: AtomicU64::new(0),
            kv_pages_total: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            step_seconds: Histogram::new(STEP_SECONDS),
            batch_rows: Histogram::new(BATCH_ROWS),
            batch_tokens: Histogram::new(BATCH_TOKENS),
            request_seconds: Histogram::new(REQUEST_SECONDS),
        }
    }
}

impl Metrics {
    pub fn finished(&self, outcome: Outcome) {
        self.requests_finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, why: Rejection) {
        self.requests_rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.load(Ordering::Relaxed));
        };
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        };
        gauge(&mut out, "lorac_queue_depth", "Requests waiting for a place in the running batch.", &self.queue_depth);
        gauge(&mut out, "lorac_requests_running", "Requests in the running batch.", &self.running);
        counter(&mut out, "lorac_prompt_tokens_total", "Prompt tokens prefilled.", &self.prompt_tokens);
        counter(&mut out, "lorac_generation_tokens_total", "Tokens generated.", &self.generation_tokens);
        let _ =
            writeln!(out, "# HELP lorac_requests_finished_total Requests ended, by reason.\n# TYPE lorac_requests_finished_total counter");
        for (reason, value) in OUTCOMES.iter().zip(&self.requests_finished) {
            let _ = writeln!(out, "lorac_requests_finished_total{{reason=\"{reason}\"}} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP lorac_requests_rejected_total Requests refused before queueing, by reason.\n# TYPE lorac_requests_rejected_total counter"
        );
        for (reason, value) in REJECTIONS.iter().zip(&self.requests_rejected) {
            let _ = writeln!(out, "lorac_requests_rejected_total{{reason=\"{reason}\"}} {}", value.load(Ordering::Relaxed));
        }
        gauge(&mut out, "lorac_adapter_slots_used", "Adapter pool slots holding an adapter.", &self.adapter_slots_used);
        gauge(&mut out, "lorac_adapter_slots_total", "Adapter pool slots (the plan's max_loras).", &self.adapter_slots_total);
        gauge(&mut out, "lorac_adapters_registered", "Adapters the server knows (resident or not).", &self.adapters_registered);
        gauge(&mut out, "lorac_kv_pages_used", "KV-cache pages held by running requests.", &self.kv_pages_used);
        gauge(&mut out, "lorac_kv_pages_total", "KV-cache pages.", &self.kv_pages_total);
        counter(
            &mut out,
            "lorac_preemptions_total",
            "Requests sent back to the queue to free KV pages (recomputed later).",
            &self.preemptions,
        );
        self.step_seconds.render(&mut out, "lorac_step_seconds", "Time of one engine step (forward and readback).");
        self.batch_rows.render(&mut out, "lorac_batch_size", "Sequences in one engine step.");
        self.batch_tokens.render(&mut out, "lorac_batch_tokens", "Tokens in one engine step (prefill and decode).");
        self.request_seconds.render(&mut out, "lorac_request_seconds", "Time from queueing to the last token.");
        out
    }
}
