//! Errors of the serving layer: [`ServerError`] for start-up (files, device, engine), and
//! [`ApiError`], what a client sees: an HTTP status with an OpenAI-style JSON body.

use std::path::PathBuf;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lorac_runtime::executor::ExecutorError;

/// Start-up failures; each names the file, device or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },

    #[error("{}: {message}", path.display())]
    ChatTemplate { path: PathBuf, message: String },

    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    #[error("device: {0}")]
    Device(String),

    #[error("engine: {0}")]
    Engine(#[from] ExecutorError),

    #[error("adapter `{name}`: {message}")]
    Adapter { name: String, message: String },

    #[error("{0}")]
    Invalid(String),

    #[error("the scheduler thread stopped: {0}")]
    Scheduler(String),
}

/// A refusal or failure reported to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `param`: the request field at fault, when one is.
    pub param: Option<&'static str>,
    /// OpenAI's `code`, e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, code: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param), ..Self::bad_request(message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { code: Some("model_not_found"), ..Self::new(StatusCode::NOT_FOUND, message) }
    }

    pub fn queue_full(max_queue: usize) -> Self {
        ApiError {
            code: Some("queue_full"),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, format!("the request queue is full ({max_queue} waiting requests); retry later"))
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn shutting_down() -> Self {
        ApiError { code: Some("shutting_down"), ..Self::unavailable("the server is shutting down") }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// OpenAI's error `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            _ => "server_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
