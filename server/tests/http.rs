//! The OpenAI-compatible server end to end on the tiny llama (wgpu; lavapipe in CI): greedy
//! output against the HF + PEFT references, a concurrent mixed-adapter batch against the same
//! requests one at a time, streaming against non-streaming, the model list, adapter loading
//! and unloading over HTTP (refusals included), LRU eviction, 429 on a full queue, cleanup
//! after clients leave, and shutdown.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use lorac_server::sampling::SamplingParams;
use lorac_server::{Event, Request};
use serde_json::{Value, json};

fn model_of(row: &RefRow) -> String {
    row.adapter.clone().unwrap_or_else(|| "llama".to_string())
}

/// A greedy completion of the row's prompt text, 8 tokens, eos not a stop (as HF generated).
fn reference_request(row: &RefRow) -> Value {
    json!({
        "model": model_of(row),
        "prompt": row.prompt,
        "max_tokens": row.generated.len(),
        "temperature": 0,
        "ignore_eos": true,
        "return_token_ids": true,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_matches_reference_and_batching_changes_nothing() {
    // A batch budget of 16 tokens: the 20-token prompt is prefilled in two chunks, and the
    // concurrent batch mixes prefill chunks with decode rows.
    let app = start(Limits { max_batch_tokens: 16, ..Limits::default() }, &["A", "B", "C"], 64);
    let rows = reference_rows();

    let mut alone = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (status, body) = post(&app, "/v1/completions", reference_request(row)).await;
        assert_eq!(status, StatusCode::OK, "row {i}: {body}");
        let choice = &body["choices"][0];
        assert_eq!(ids(&choice["prompt_token_ids"]), row.input_ids, "row {i}: the tokenizer differs from HF's");
        assert_eq!(ids(&choice["token_ids"]), row.generated, "row {i} ({:?}): greedy tokens differ from HF + PEFT", row.adapter);
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(body["usage"]["prompt_tokens"], row.input_ids.len());
        assert_eq!(body["usage"]["completion_tokens"], row.generated.len());
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["model"], model_of(row));
        alone.push(choice.clone());
    }

    let before = app.scheduler.metrics().batch_rows.count_above(1.0);
    let together = futures::future::join_all(rows.iter().map(|row| post(&app, "/v1/completions", reference_request(row)))).await;
    for (i, ((status, body), single)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*status, StatusCode::OK, "row {i}: {body}");
        assert_eq!(body["choices"][0]["text"], single["text"], "row {i}: batched text differs from the request alone");
        assert_eq!(body["choices"][0]["token_ids"], single["token_ids"], "row {i}");
    }
    let after = app.scheduler.metrics().batch_rows.count_above(1.0);
    assert!(after > before, "the concurrent requests never shared a step");

    // Same again through the token-array prompt form.
    let row = &rows[1];
    let (status, body) = post(
        &app,
        "/v1/completions",
        json!({"model": "B", "prompt": row.input_ids, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["choices"][0]["token_ids"]), row.generated);

    let (status, metrics) = get(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "lorac_queue_depth",
        "lorac_requests_running 0",
        "lorac_generation_tokens_total",
        "lorac_step_seconds_bucket",
        "lorac_adapter_slots_used 3",
        "lorac_adapter_slots_total 4",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    assert!(metrics.contains("lorac_prompt_tokens_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_gives_the_non_streaming_text() {
    let app = start(Limits::default(), &["A"], 16);
    let base = json!({"model": "A", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, whole) = post(&app, "/v1/completions", base.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");

    let mut streaming = base.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (status, body) = send(&app, "POST", "/v1/completions", Some(streaming)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["text"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let finish: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage, &whole["usage"]);

    // Chat: the same through both paths, and the prompt is the HF template's ids.
    let chat = json!({
        "model": "llama",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}],
        "max_tokens": 10, "temperature": 0, "ignore_eos": true, "return_token_ids": true,
    });
    let (status, whole) = post(&app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let examples: Value = serde_json::from_slice(&std::fs::read(fixture("tokenizer").join("examples.json")).unwrap()).unwrap();
    assert_eq!(whole["choices"][0]["prompt_token_ids"], examples["chat"]["ids"], "chat prompt ids differ from HF's apply_chat_template");
    let mut streaming = chat.clone();
    streaming["stream"] = json!(true);
    let (status, body) = send(&app, "POST", "/v1/chat/completions", Some(streaming)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());

    // Stop strings cut the text before the match, in both paths alike.
    let full = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    if let Some(stop) = full.char_indices().nth(3).map(|(i, _)| full[i..].chars().take(2).collect::<String>()) {
        let mut stopped = chat.clone();
        stopped["stop"] = json!([stop]);
        let (_, whole_stop) = post(&app, "/v1/chat/completions", stopped.clone()).await;
        let cut = whole_stop["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        assert_eq!(cut, full[..full.find(&stop).unwrap()], "stop {stop:?} in {full:?}");
        assert_eq!(whole_stop["choices"][0]["finish_reason"], "stop");
        stopped["stream"] = json!(true);
        let (_, body) = send(&app, "POST", "/v1/chat/completions", Some(stopped)).await;
        let events = sse_data(&body);
        let text: String = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect();
        assert_eq!(text, cut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_unload_and_refusals_over_http() {
    let app = start(Limits::default(), &["A"], 16);
    assert_eq!(model_names(&app).await, vec![("llama".to_string(), true), ("A".to_string(), true)]);

    let (status, body) = send(&app, "POST", "/v1/load_lora_adapter", Some(json!({"lora_name": "B", "lora_path": adapter("B")}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("added successfully"), "{body}");
    let names: Vec<String> = model_names(&app).await.into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["llama", "A", "B"]);

    // Every bad adapter is refused with the loader's message; nothing changes.
    let bad = fixture("llama").join("bad_adapters");
    for (dir, expected) in [
        ("rank_128", "rank 128"),
        ("dora", "DoRA"),
        ("wrong_shape", "shape"),
        ("missing_tensor", "missing"),
        ("truncated", "truncated"),
        ("modules_to_save_embed", "embed_tokens"),
        ("added_tokens", "trainable_token_indices"),
    ] {
        let (status, body) =
            post(&app, "/v1/load_lora_adapter", json!({"lora_name": format!("bad_{dir}"), "lora_path": bad.join(dir)})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{dir}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.to_lowercase().contains(&expected.to_lowercase()), "{dir}: {message}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let names: Vec<String> = model_names(&app).await.into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["llama", "A", "B"]);

    // Still serving, with the adapters it had.
    let rows = reference_rows();
    let (status, body) = post(&app, "/v1/completions", reference_request(&rows[1])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["choices"][0]["token_ids"]), rows[1].generated);

    // Duplicate name, unknown model, missing directory, malformed body.
    let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": "B", "lora_path": adapter("B")})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("already been loaded"));
    let (status, body) = post(&app, "/v1/completions", json!({"model": "nope", "prompt": "hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": "X", "lora_path": "/nonexistent/adapter"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("/nonexistent/adapter"), "{body}");
    let (status, body) = post(&app, "/v1/completions", json!({"prompt": "no model field"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // The same directory under a second name (names, not directories, identify adapters).
    let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": "B-again", "lora_path": adapter("B")})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&app, "/v1/completions", json!({"model": "B-again", "prompt": rows[1].prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "return_token_ids": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["choices"][0]["token_ids"]), rows[1].generated);

    // Unload: gone from the list, 404 afterwards, 404 to unload twice.
    let (status, body) = post(&app, "/v1/unload_lora_adapter", json!({"lora_name": "B"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<String> = model_names(&app).await.into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["llama", "A", "B-again"]);
    let (status, _) = post(&app, "/v1/completions", json!({"model": "B", "prompt": "hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(&app, "/v1/unload_lora_adapter", json!({"lora_name": "B"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_evicts_the_least_recently_used_idle_adapter() {
    let app = start(Limits { max_loras: 2, ..Limits::default() }, &[], 16);
    let rows = reference_rows();
    for name in ["A", "B"] {
        let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": name, "lora_path": adapter(name)})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // A used after B was loaded: B is now the least recently used.
    let (status, body) = post(&app, "/v1/completions", reference_request(&rows[0])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": "C", "lora_path": adapter("C")})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let models = model_names(&app).await;
    assert_eq!(
        models,
        vec![("llama".into(), true), ("A".into(), true), ("B".into(), false), ("C".into(), true)],
        "B should have been evicted"
    );
    let metrics = get(&app, "/metrics").await.1;
    assert!(metrics.contains("lorac_adapter_slots_used 2") && metrics.contains("lorac_adapters_registered 3"), "{metrics}");

    // B is still served: it is swapped back in (evicting the LRU of A and C) and is exact.
    for row in [&rows[1], &rows[2], &rows[0]] {
        let (status, body) = post(&app, "/v1/completions", reference_request(row)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(ids(&body["choices"][0]["token_ids"]), row.generated, "{:?} after swapping", row.adapter);
    }

    // Pinned adapters are never evicted; once every slot is pinned, a new adapter is refused.
    for name in ["pinned1", "pinned2"] {
        let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": name, "lora_path": adapter("A"), "pin": true})).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
    }
    let (status, body) = post(&app, "/v1/load_lora_adapter", json!({"lora_name": "D", "lora_path": adapter("B")})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("pinned"), "{body}");
    let (status, body) = post(&app, "/v1/completions", json!({"model": "B", "prompt": "x"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_leaving_clients_free_everything() {
    // One running sequence at a time and one waiting place.
    let app = start(Limits { max_seqs: 1, ..Limits::default() }, &["A"], 1);
    let handle = &app.scheduler;
    let long = |model: &str| Request {
        model: model.to_string(),
        prompt: vec![1, 303, 225, 433],
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(1500) },
    };
    let mut running = handle.submit(long("A")).expect("first request");
    assert!(wait_until(60, || handle.metrics().running.load(Ordering::Relaxed) == 1).await);
    let queued = handle.submit(long("llama")).expect("second request waits");
    let (status, body) = post(&app, "/v1/completions", json!({"model": "llama", "prompt": "hi", "max_tokens": 4})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(get(&app, "/metrics").await.1.contains("lorac_requests_rejected_total{reason=\"queue_full\"} 1"));

    // The first request is generating; both clients leave.
    assert!(matches!(running.recv().await, Some(Event::Delta { .. })));
    drop(running);
    drop(queued);
    let metrics = handle.metrics();
    assert!(
        wait_until(60, || {
            metrics.running.load(Ordering::Relaxed) == 0
                && metrics.queue_depth.load(Ordering::Relaxed) == 0
                && metrics.kv_pages_used.load(Ordering::Relaxed) == 0
        })
        .await,
        "cancelled requests still hold the batch, the queue or KV pages"
    );
    // The freed place serves a new request, and the whole cache is available again.
    let (status, body) = post(&app, "/v1/completions", json!({"model": "A", "prompt": "hi", "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    // Requests that can never be served: too long for the context.
    let (status, body) = post(&app, "/v1/completions", json!({"model": "A", "prompt": "hi", "max_tokens": 100000})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_running_requests_with_a_final_event() {
    let app = start(Limits::default(), &[], 4);
    let handle = &app.scheduler;
    let request = Request {
        model: "llama".into(),
        prompt: vec![1, 303],
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(1800) },
    };
    let mut events = handle.submit(request.clone()).unwrap();
    assert!(matches!(events.recv().await, Some(Event::Delta { .. })));
    handle.shutdown(Duration::ZERO);
    let last = loop {
        match events.recv().await {
            Some(Event::Delta { .. }) => continue,
            other => break other,
        }
    };
    match last {
        Some(Event::Error(e)) => assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE),
        other => panic!("expected a shutdown error, got {other:?}"),
    }
    assert_eq!(handle.submit(request).unwrap_err().status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::task::spawn_blocking({
        let handle = handle.clone();
        move || handle.join()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_cache_preempts_and_recomputes_without_changing_output() {
    // 64 cache tokens = 4 pages of 16: three requests of up to 55 tokens each cannot all hold
    // their cache at once, so the scheduler must preempt and recompute.
    let app = start(Limits { kv_cache_tokens: 64, ..Limits::default() }, &["A", "B", "C"], 16);
    let rows = reference_rows();
    let request = |row: &RefRow| json!({"model": model_of(row), "prompt": row.prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let mut alone = Vec::new();
    for row in &rows[..3] {
        let (status, body) = post(&app, "/v1/completions", request(row)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(ids(&body["choices"][0]["token_ids"])[..8], row.generated[..]);
        alone.push(body["choices"][0]["token_ids"].clone());
    }
    assert_eq!(app.scheduler.metrics().preemptions.load(Ordering::Relaxed), 0);
    let together = futures::future::join_all(rows[..3].iter().map(|row| post(&app, "/v1/completions", request(row)))).await;
    for (i, ((status, body), single)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*status, StatusCode::OK, "row {i}: {body}");
        assert_eq!(&body["choices"][0]["token_ids"], single, "row {i}: preemption changed the output");
        assert_eq!(body["usage"]["prompt_tokens"], rows[i].input_ids.len());
        assert_eq!(body["usage"]["completion_tokens"], 40);
    }
    assert!(app.scheduler.metrics().preemptions.load(Ordering::Relaxed) > 0, "the cache never filled up");
    let metrics = get(&app, "/metrics").await.1;
    assert!(metrics.contains("lorac_kv_pages_used 0") && metrics.contains("lorac_requests_running 0"), "{metrics}");
}
