//! Text in and out of the model: the HF tokenizer (`tokenizer.json`), the special tokens and
//! chat template (`tokenizer_config.json`, `chat_template.jinja`), the stop tokens
//! (`generation_config.json`), incremental detokenization and stop strings.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{ApiError, ServerError};

/// One chat message as templates see it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Generation defaults a checkpoint ships in `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
}

/// Everything text-side the server needs from a model directory.
pub struct TextCodec {
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    /// Token ids that end a generation (generation_config's `eos_token_id` and the
    /// tokenizer's `eos_token`).
    eos_ids: Vec<u32>,
    special: SpecialTokens,
    defaults: GenerationDefaults,
}

#[derive(Debug, Clone, Default, Serialize)]
struct SpecialTokens {
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
}

struct ChatTemplate {
    source: String,
    /// Where the template came from, for error messages.
    path: PathBuf,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ServerError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ServerError::Config { path: path.to_path_buf(), message: format!("not valid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServerError::Io { path: path.to_path_buf(), source }),
    }
}

/// A special token in tokenizer_config.json: a string, or an AddedToken object with `content`.
fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl TextCodec {
    /// Loads the tokenizer, special tokens, chat template and stop tokens of `model_dir`.
    /// Only `tokenizer.json` is required; a missing chat template only disables chat.
    pub fn from_model_dir(model_dir: &Path) -> Result<TextCodec, ServerError> {
        let tokenizer_path = model_dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(ServerError::Tokenizer {
                path: tokenizer_path,
                message: "not found (lorac needs the fast-tokenizer file that `save_pretrained` writes)".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ServerError::Tokenizer { path: tokenizer_path.clone(), message: format!("cannot load tokenizer: {e}") })?;

        let config_path = model_dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(serde_json::Value::Null);
        let special = SpecialTokens {
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            pad_token: token_text(config.get("pad_token")),
            unk_token: token_text(config.get("unk_token")),
        };

        // transformers 5 writes the template to its own file; older checkpoints keep it in
        // tokenizer_config.json, as a string or a list of named templates.
        let template_path = model_dir.join("chat_template.jinja");
        let chat = if template_path.is_file() {
            let source =
                std::fs::read_to_string(&template_path).map_err(|source| ServerError::Io { path: template_path.clone(), source })?;
            Some(ChatTemplate { source, path: template_path })
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(ChatTemplate { source: s.clone(), path: config_path.clone() }),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| named.first())
                    .and_then(|t| t.get("template")?.as_str())
                    .map(|s| ChatTemplate { source: s.to_string(), path: config_path.clone() }),
                _ => None,
            }
        };
        if let Some(chat) = &chat {
            // Parse once at start-up so a broken template fails here, not on the first chat.
            template_env().template_from_str(&chat.source).map_err(|e| ServerError::ChatTemplate {
                path: chat.path.clone(),
                message: format!("cannot parse the chat template: {e}"),
            })?;
        }

        let generation_path = model_dir.join("generation_config.json");
        let generation = read_json(&generation_path)?.unwrap_or(serde_json::Value::Null);
        let mut eos_ids: Vec<u32> = match generation.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(ids)) => ids.iter().filter_map(|v| v.as_u64()).map(|id| id as u32).collect(),
            _ => Vec::new(),
        };
        if let Some(id) = special.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)).filter(|id| !eos_ids.contains(id)) {
            eos_ids.push(id);
        }
        let defaults = GenerationDefaults {
            temperature: generation.get("temperature").and_then(|v| v.as_f64()).map(|v| v as f32),
            top_p: generation.get("top_p").and_then(|v| v.as_f64()).map(|v| v as f32),
            top_k: generation.get("top_k").and_then(|v| v.as_u64()).map(|v| v as u32),
        };
        Ok(TextCodec { tokenizer, chat, eos_ids, special, defaults })
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (e.g. prepends bos).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| format!("detokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The prompt text of a chat, as transformers' `apply_chat_template` renders it.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ApiError> {
        let chat = self.chat.as_ref().ok_or_else(|| {
            ApiError::bad_request("this model has no chat template (no chat_template.jinja and no `chat_template` in tokenizer_config.json); use /v1/completions")
        })?;
        let env = template_env();
        let template = env.template_from_str(&chat.source).map_err(|e| ApiError::internal(format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.special.bos_token,
            eos_token => self.special.eos_token,
            pad_token => self.special.pad_token,
            unk_token => self.special.unk_token,
        };
        template.render(ctx).map_err(|e| match e.kind() {
            // The template refused the conversation (`raise_exception`): the client's fault.
            ErrorKind::InvalidOperation => {
                ApiError::bad_request(format!("chat template: {}", e.detail().unwrap_or("refused the messages")))
            }
            _ => ApiError::bad_request(format!("chat template ({}): {e}", chat.path.display())),
        })
    }

    /// The ids of a chat prompt: the template adds the special tokens itself, so the
    /// tokenizer's post-processor does not run (transformers does the same).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let text = self.render_chat(messages, true)?;
        self.encode(&text, false)
    }
}

/// The Jinja environment transformers renders chat templates with: trimmed blocks, loop
/// controls, `raise_exception`, `strftime_now`, Python string methods.
fn template_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env
}

/// The current UTC date and time in a strftime `format` (the directives HF templates use).
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Turns generated ids into text as they come, and applies stop strings.
///
/// Byte-level BPE tokens can end inside a UTF-8 character, so text is released only once
/// it decodes without a trailing replacement character (TGI's prefix/read offsets). Text
/// that could be the start of a stop string is held back until it is known not to be one,
/// so a stream never shows text the final answer cuts.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded text so far (stop string cut applied once found).
    text: String,
    /// Bytes of `text` already handed out.
    released: usize,
    stops: Vec<String>,
    /// A stop string matched: nothing more is released.
    stopped: bool,
}

/// What one new token changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TextDelta {
    pub text: String,
    /// A stop string matched; the text ends right before it.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<TextDelta, String> {
        if self.stopped {
            return Ok(TextDelta { text: String::new(), stopped: true });
        }
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = codec.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        if let Some(cut) = self.find_stop() {
            self.text.truncate(cut);
            self.stopped = true;
            let text = self.take(self.text.len());
            return Ok(TextDelta { text, stopped: true });
        }
        let safe = self.text.len() - self.stop_prefix_len();
        Ok(TextDelta { text: self.take(safe), stopped: false })
    }

    /// Everything not yet released (at the end of a generation not ended by a stop string),
    /// including a trailing partial character.
    pub fn finish(&mut self, codec: &TextCodec) -> Result<String, String> {
        if self.stopped {
            return Ok(String::new());
        }
        if self.read_offset < self.ids.len() {
            let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
            let full = codec.decode(&self.ids[self.prefix_offset..])?;
            if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
                self.text.push_str(&full[prefix.len()..]);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.take(self.text.len()))
    }

    fn take(&mut self, upto: usize) -> String {
        if upto <= self.released {
            return String::new();
        }
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }

    /// Byte offset of the earliest stop string, searching only where new text could complete one.
    fn find_stop(&self) -> Option<usize> {
        let longest = self.stops.iter().map(String::len).max()?;
        let mut from = self.released.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    /// Length of the longest tail of the text that is a proper prefix of some stop string.
    fn stop_prefix_len(&self) -> usize {
        let mut held = 0;
        for stop in &self.stops {
            for (k, _) in stop.char_indices().skip(1) {
                if k > held && self.text.ends_with(&stop[..k]) {
                    held = k;
                }
            }
        }
        held.min(self.text.len() - self.released)
    }
}
