//! The HTTP API (axum): OpenAI's `/v1/completions`, `/v1/chat/completions` (streaming over
//! SSE or not), `/v1/models`; vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`;
//! `/health` and Prometheus `/metrics`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::openai::{ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, parse};
use crate::sampling::Rng;
use crate::scheduler::{Event, FinishReason, SchedulerHandle, Usage};
use crate::text::TextCodec;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub scheduler: SchedulerHandle,
    pub codec: Arc<TextCodec>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(generate::<CompletionRequest>))
        .route("/v1/chat/completions", post(generate::<ChatRequest>))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", Rng::from_entropy().next_u64())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completion,
    Chat,
}

/// Response framing shared by the streaming and non-streaming paths.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    prompt_ids: Vec<u32>,
    include_usage: bool,
    return_token_ids: bool,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completion, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }

    /// One streamed choice: new text (or a chat delta) and, at the end, the finish reason.
    fn chunk(&self, delta: Option<Value>, text: &str, token_ids: &[u32], finish: Option<FinishReason>) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            Endpoint::Chat => {
                json!({"index": 0, "delta": delta.unwrap_or_else(|| json!({"content": text})), "logprobs": null, "finish_reason": finish})
            }
        };
        if self.return_token_ids && !token_ids.is_empty() {
            choice["token_ids"] = json!(token_ids);
        }
        self.envelope(true, json!([choice]))
    }

    fn complete(&self, text: String, token_ids: Vec<u32>, finish: FinishReason, usage: Usage) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        if self.return_token_ids {
            choice["token_ids"] = json!(token_ids);
            choice["prompt_token_ids"] = json!(self.prompt_ids);
        }
        let mut body = self.envelope(false, json!([choice]));
        body["usage"] = json!(usage);
        body
    }
}

/// The two generation endpoints differ only in how the request becomes a prompt and in the
/// shape of their replies.
trait GenerationRequest: serde::de::DeserializeOwned {
    const ENDPOINT: Endpoint;
    const ID_PREFIX: &'static str;
    fn to_request(&self, codec: &TextCodec) -> Result<crate::scheduler::Request, ApiError>;
    fn model(&self) -> &str;
    fn sampling(&self) -> &crate::openai::Sampling;
}

impl GenerationRequest for CompletionRequest {
    const ENDPOINT: Endpoint = Endpoint::Completion;
    const ID_PREFIX: &'static str = "cmpl";
    fn to_request(&self, codec: &TextCodec) -> Result<crate::scheduler::Request, ApiError> {
        CompletionRequest::to_request(self, codec)
    }
    fn model(&self) -> &str {
        &self.model
    }
    fn sampling(&self) -> &crate::openai::Sampling {
        &self.sampling
    }
}

impl GenerationRequest for ChatRequest {
    const ENDPOINT: Endpoint = Endpoint::Chat;
    const ID_PREFIX: &'static str = "chatcmpl";
    fn to_request(&self, codec: &TextCodec) -> Result<crate::scheduler::Request, ApiError> {
        ChatRequest::to_request(self, codec)
    }
    fn model(&self) -> &str {
        &self.model
    }
    fn sampling(&self) -> &crate::openai::Sampling {
        &self.sampling
    }
}

async fn generate<Q: GenerationRequest>(State(state): State<AppState>, body: Bytes) -> Response {
    let result = async {
        let request: Q = parse(&body)?;
        let scheduled = request.to_request(&state.codec)?;
        let sampling = request.sampling();
        let reply = Reply {
            endpoint: Q::ENDPOINT,
            id: request_id(Q::ID_PREFIX),
            created: now(),
            model: request.model().to_string(),
            prompt_ids: scheduled.prompt.clone(),
            include_usage: sampling.include_usage(),
            return_token_ids: sampling.return_token_ids,
        };
        let stream = sampling.stream;
        let events = state.scheduler.submit(scheduled)?;
        Ok::<_, ApiError>((reply, events, stream))
    }
    .await;
    match result {
        Ok((reply, events, true)) => stream(reply, events).into_response(),
        Ok((reply, events, false)) => collect(reply, events).await,
        Err(e) => e.into_response(),
    }
}

/// Non-streaming: waits for the whole generation. If the client goes away, this future is
/// dropped with the receiver, which cancels the request.
async fn collect(reply: Reply, mut events: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut token_ids = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Delta { text: delta, token_id } => {
                text.push_str(&delta);
                token_ids.extend(token_id);
            }
            Event::Done { finish_reason, usage } => {
                return axum::Json(reply.complete(text, token_ids, finish_reason, usage)).into_response();
            }
            Event::Error(e) => return e.into_response(),
        }
    }
    ApiError::internal("the scheduler stopped before the request ended").into_response()
}

struct StreamState {
    reply: Reply,
    events: UnboundedReceiver<Event>,
    out: VecDeque<SseEvent>,
    done: bool,
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// Streaming: OpenAI's SSE chunks, then `data: [DONE]`. Dropping the stream (client gone)
/// drops the receiver, which cancels the request.
fn stream(reply: Reply, events: UnboundedReceiver<Event>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut out = VecDeque::new();
    if reply.endpoint == Endpoint::Chat {
        out.push_back(data(&reply.chunk(Some(json!({"role": "assistant", "content": ""})), "", &[], None)));
    }
    let state = StreamState { reply, events, out, done: false };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.out.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            match s.events.recv().await {
                Some(Event::Delta { text, token_id }) => {
                    let ids: Vec<u32> = token_id.into_iter().collect();
                    if !text.is_empty() || (s.reply.return_token_ids && !ids.is_empty()) {
                        s.out.push_back(data(&s.reply.chunk(None, &text, &ids, None)));
                    }
                }
                Some(Event::Done { finish_reason, usage }) => {
                    let delta = (s.reply.endpoint == Endpoint::Chat).then(|| json!({}));
                    s.out.push_back(data(&s.reply.chunk(delta, "", &[], Some(finish_reason))));
                    if s.reply.include_usage {
                        let mut last = s.reply.envelope(true, json!([]));
                        last["usage"] = json!(usage);
                        s.out.push_back(data(&last));
                    }
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                Some(Event::Error(e)) => {
                    s.out.push_back(data(&e.body()));
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                None => {
                    s.out.push_back(data(&ApiError::internal("the scheduler stopped before the request ended").body()));
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn models(State(state): State<AppState>) -> Response {
    let created = now();
    let info = state.scheduler.info();
    let base = info.served_model_name.clone();
    let data: Vec<Value> = state
        .scheduler
        .models()
        .into_iter()
        .map(|m| {
            let (root, parent) = match &m.path {
                None => (Value::String(base.clone()), Value::Null),
                Some(path) => (Value::String(path.display().to_string()), Value::String(base.clone())),
            };
            json!({
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "lorac",
                "root": root,
                "parent": parent,
                "max_model_len": info.max_seq_len,
                "resident": m.resident,
                "pinned": m.pinned,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn load_adapter(State(state): State<AppState>, body: Bytes) -> Response {
    let result = async {
        let request: LoadAdapterRequest = parse(&body)?;
        let name = request.lora_name.clone();
        state.scheduler.load_adapter(request.lora_name, PathBuf::from(request.lora_path), request.pin).await?;
        Ok::<_, ApiError>(name)
    }
    .await;
    match result {
        Ok(name) => (StatusCode::OK, format!("Success: LoRA adapter '{name}' added successfully.")).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn unload_adapter(State(state): State<AppState>, body: Bytes) -> Response {
    let result = async {
        let request: UnloadAdapterRequest = parse(&body)?;
        let name = request.lora_name.clone();
        state.scheduler.unload_adapter(request.lora_name).await?;
        Ok::<_, ApiError>(name)
    }
    .await;
    match result {
        Ok(name) => (StatusCode::OK, format!("Success: LoRA adapter '{name}' removed successfully.")).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn health(State(state): State<AppState>) -> Response {
    if state.scheduler.is_shutting_down() { ApiError::shutting_down().into_response() } else { StatusCode::OK.into_response() }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.scheduler.metrics().render()).into_response()
}
