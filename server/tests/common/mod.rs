//! Helpers for the server tests: plans for the tiny fixtures, an in-process server, JSON
//! requests through the router (tower's `oneshot`), SSE parsing, the HF references.

#![allow(dead_code)]

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use lorac_server::{AppState, DeviceChoice, StartOptions};
use serde_json::Value;
use tower::ServiceExt;

pub fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny").join(model)
}

pub fn adapter(name: &str) -> PathBuf {
    fixture("llama").join("adapters").join(name)
}

pub struct Limits {
    pub max_loras: u32,
    pub max_seqs: u32,
    pub max_batch_tokens: u32,
    pub kv_cache_tokens: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_loras: 4, max_seqs: 8, max_batch_tokens: 64, kv_cache_tokens: 2048 }
    }
}

pub fn plan(dir: &Path, limits: &Limits) -> lorac_plan::Plan {
    let mut opts = lorac_compiler::CompileOptions::new(1, 16, limits.max_loras, &["all"]).expect("options");
    opts.max_batch_tokens = NonZeroU32::new(limits.max_batch_tokens).unwrap();
    opts.max_seqs = NonZeroU32::new(limits.max_seqs).unwrap();
    opts.kv_cache_tokens = limits.kv_cache_tokens;
    lorac_compiler::compile(dir, &opts).expect("compile")
}

/// The tiny llama on wgpu (lavapipe in CI) with `adapters` pinned at start-up.
pub fn start(limits: Limits, adapters: &[&str], max_queue: usize) -> AppState {
    let dir = fixture("llama");
    let options = StartOptions {
        model_dir: dir.clone(),
        device: DeviceChoice::Wgpu,
        served_model_name: None,
        adapters: adapters.iter().map(|a| (a.to_string(), adapter(a))).collect(),
        max_queue,
        // Past the tiny model's 256 positions, so requests stay running long enough for the
        // tests that act on running requests.
        max_model_len: Some(2048),
        on_load: None,
    };
    lorac_server::start(plan(&dir, &limits), options).expect("server starts").0
}

pub async fn send(app: &AppState, method: &str, path: &str, body: Option<Value>) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = lorac_server::router(app.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub async fn post(app: &AppState, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = send(app, "POST", path, Some(body)).await;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

pub async fn get(app: &AppState, path: &str) -> (StatusCode, String) {
    send(app, "GET", path, None).await
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).map(str::to_string).collect()
}

pub async fn model_names(app: &AppState) -> Vec<(String, bool)> {
    let (status, body) = get(app, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap().to_string(), m["resident"].as_bool().unwrap())).collect()
}

pub struct RefRow {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub adapter: Option<String>,
    pub generated: Vec<u32>,
}

pub fn reference_rows() -> Vec<RefRow> {
    let json: Value = serde_json::from_slice(&std::fs::read(fixture("llama").join("reference.json")).unwrap()).unwrap();
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| RefRow {
            prompt: r["prompt"].as_str().unwrap().to_string(),
            input_ids: ids(&r["input_ids"]),
            adapter: r["adapter"].as_str().map(str::to_string),
            generated: ids(&r["generated_ids"]),
        })
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap_or_else(|| panic!("not an id list: {v}")).iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Polls the scheduler's metrics until `done` holds (at most `secs` seconds).
pub async fn wait_until(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if done() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    done()
}
