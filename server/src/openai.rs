//! OpenAI-compatible request bodies (completions, chat completions, vLLM's adapter API) and
//! how they become a scheduler [`Request`]: tokenization, sampling defaults, and refusals of
//! options lorac does not implement (rather than silently ignoring them).

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::sampling::SamplingParams;
use crate::scheduler::Request;
use crate::text::{ChatMessage, TextCodec};

/// OpenAI's completion prompt: a string, token ids, or a one-element list of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and streaming fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM extension; -1 or 0 keeps every token.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// vLLM extension: keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM extension: the prompt's and completion's token ids in the response.
    #[serde(default)]
    pub return_token_ids: bool,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
    pub best_of: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub tools: Option<Vec<Value>>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
    /// Never evicted (lorac extension).
    #[serde(default)]
    pub pin: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

/// Parses a JSON body, answering 400 with serde's message (axum's own extractor says 422 in
/// plain text, which OpenAI clients do not expect).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn unsupported(param: &'static str, what: &str) -> ApiError {
    ApiError::invalid_param(param, format!("{what} is not supported by lorac"))
}

impl Sampling {
    /// Sampling parameters with the checkpoint's defaults (generation_config.json) for what
    /// the request leaves out, OpenAI's (temperature 1, top_p 1) otherwise.
    pub fn params(&self, codec: &TextCodec, max_tokens: u32) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "more than one choice per request (n > 1)"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(unsupported("best_of", "best_of > 1"));
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) || self.top_logprobs.is_some() {
            return Err(unsupported("logprobs", "logprobs"));
        }
        for (param, value, neutral) in [
            ("presence_penalty", self.presence_penalty, 0.0),
            ("frequency_penalty", self.frequency_penalty, 0.0),
            ("repetition_penalty", self.repetition_penalty, 1.0),
        ] {
            if value.is_some_and(|v| v != neutral) {
                return Err(unsupported(param, param));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
            return Err(unsupported("logit_bias", "logit_bias"));
        }
        let defaults = codec.generation_defaults();
        let temperature = self.temperature.or(defaults.temperature).unwrap_or(1.0);
        if !(0.0..=100.0).contains(&temperature) || !temperature.is_finite() {
            return Err(ApiError::invalid_param("temperature", format!("temperature must be in [0, 100], got {temperature}")));
        }
        let top_p = self.top_p.or(defaults.top_p).unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = match self.top_k {
            Some(k) if k < -1 => return Err(ApiError::invalid_param("top_k", format!("top_k must be -1 (all) or positive, got {k}"))),
            Some(k) if k > 0 => k.min(i64::from(u32::MAX)) as u32,
            Some(_) => 0,
            None => defaults.top_k.unwrap_or(0),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::invalid_param("stop", "at most 16 stop strings"));
        }
        Ok(SamplingParams { temperature, top_p, top_k, seed: self.seed, max_tokens, stop, ignore_eos: self.ignore_eos })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// OpenAI's default `max_tokens` for completions.
const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

impl CompletionRequest {
    pub fn to_request(&self, codec: &TextCodec) -> Result<Request, ApiError> {
        if self.echo {
            return Err(unsupported("echo", "echo"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix", "suffix"));
        }
        let one = |n: usize| {
            if n == 1 { Ok(()) } else { Err(ApiError::invalid_param("prompt", format!("one prompt per request is supported, got {n}"))) }
        };
        let prompt = match &self.prompt {
            // Text prompts get the tokenizer's special tokens (bos), as vLLM and HF do.
            Prompt::Text(text) => codec.encode(text, true)?,
            Prompt::Texts(texts) => {
                one(texts.len())?;
                codec.encode(&texts[0], true)?
            }
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::TokenLists(lists) => {
                one(lists.len())?;
                lists[0].clone()
            }
        };
        if self.max_tokens == Some(0) {
            return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
        }
        let params = self.sampling.params(codec, self.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS))?;
        Ok(Request { model: self.model.clone(), prompt, params })
    }
}

impl ChatRequest {
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "messages is empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(text)) => text.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid_param(
                                        "messages",
                                        format!("messages[{i}]: content part of type `{kind}` is not supported (text only)"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage { role: m.role.clone(), content })
            })
            .collect()
    }

    pub fn to_request(&self, codec: &TextCodec) -> Result<Request, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported("tools", "tool calling"));
        }
        let prompt = codec.encode_chat(&self.messages()?)?;
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
        }
        // 0: the rest of the context (filled in by the scheduler handle).
        let params = self.sampling.params(codec, max_tokens.unwrap_or(0))?;
        Ok(Request { model: self.model.clone(), prompt, params })
    }
}
