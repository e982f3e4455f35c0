//! Tokenizer and chat template against transformers' own output for the shared tiny
//! tokenizer (tests/fixtures/tiny/tokenizer/examples.json); template sources; stop strings.

mod common;

use common::fixture;
use lorac_server::text::{ChatMessage, TextCodec, TextStream};
use serde_json::Value;

fn examples() -> Value {
    serde_json::from_slice(&std::fs::read(fixture("tokenizer").join("examples.json")).unwrap()).unwrap()
}

fn chat_messages(examples: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(examples["chat"]["messages"].clone()).unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lorac-server-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn tokenizer_matches_hf() {
    let codec = TextCodec::from_model_dir(&fixture("llama")).unwrap();
    let examples = examples();
    for example in examples["examples"].as_array().unwrap() {
        let text = example["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(example["ids"].clone()).unwrap();
        assert_eq!(codec.encode(text, true).unwrap(), ids, "{text:?}");
        assert_eq!(codec.decode(&ids).unwrap(), example["decoded_skip_special"].as_str().unwrap(), "{text:?}");
    }
    assert_eq!(codec.eos_ids(), [2]);
}

#[test]
fn chat_template_renders_like_hf() {
    let examples = examples();
    let messages = chat_messages(&examples);
    let rendered = examples["chat"]["rendered"].as_str().unwrap();
    let ids: Vec<u32> = serde_json::from_value(examples["chat"]["ids"].clone()).unwrap();
    // Derived by reading chat_template.jinja: bos, then `<|im_start|>{role}\n{content}<|im_end|>\n`
    // per message, then the generation prompt.
    let by_hand = "<|bos|><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(rendered, by_hand);

    // transformers 5 layout: chat_template.jinja.
    let codec = TextCodec::from_model_dir(&fixture("llama")).unwrap();
    assert_eq!(codec.render_chat(&messages, true).unwrap(), rendered);
    assert_eq!(codec.encode_chat(&messages).unwrap(), ids);
    assert_eq!(codec.render_chat(&messages, false).unwrap(), rendered.strip_suffix("<|im_start|>assistant\n").unwrap());

    // Older layout: the template inside tokenizer_config.json, no .jinja file.
    let dir = temp_dir("template-in-config");
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture("llama").join(file), dir.join(file)).unwrap();
    }
    let codec = TextCodec::from_model_dir(&dir).unwrap();
    assert!(codec.has_chat_template());
    assert_eq!(codec.render_chat(&messages, true).unwrap(), rendered);

    // A template that refuses a conversation: the client gets its message as a 400.
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let mut config = config.as_object().unwrap().clone();
    config.insert(
        "chat_template".into(),
        Value::String(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content | trim }}{% endfor %}"
                .into(),
        ),
    );
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let codec = TextCodec::from_model_dir(&dir).unwrap();
    let error = codec.render_chat(&messages, true).unwrap_err();
    assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
    assert!(error.message.contains("System role not supported"), "{}", error.message);
    assert_eq!(codec.render_chat(&messages[1..], true).unwrap(), "Hello, world!");

    // No template at all: chat is refused with a pointer to /v1/completions.
    config.remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let codec = TextCodec::from_model_dir(&dir).unwrap();
    assert!(codec.render_chat(&messages, true).unwrap_err().message.contains("no chat template"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_or_broken_files_are_named() {
    let dir = temp_dir("missing");
    let error = TextCodec::from_model_dir(&dir).err().unwrap().to_string();
    assert!(error.contains("tokenizer.json") && error.contains("not found"), "{error}");
    std::fs::write(dir.join("tokenizer.json"), b"{ not json").unwrap();
    let error = TextCodec::from_model_dir(&dir).err().unwrap().to_string();
    assert!(error.contains("tokenizer.json"), "{error}");
    std::fs::copy(fixture("llama").join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), b"{% for m in messages %}{{ m.content }").unwrap();
    let error = TextCodec::from_model_dir(&dir).err().unwrap().to_string();
    assert!(error.contains("chat_template.jinja") && error.contains("parse"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stop_strings_hold_back_only_what_may_match() {
    let codec = TextCodec::from_model_dir(&fixture("llama")).unwrap();
    let text = "The quick brown fox jumps";
    let ids = codec.encode(text, false).unwrap();
    for stop in ["brown", "ox j", "zzz", "s"] {
        let mut stream = TextStream::new(vec![stop.to_string()]);
        let mut out = String::new();
        let mut stopped = false;
        for &id in &ids {
            let delta = stream.push(&codec, id).unwrap();
            out.push_str(&delta.text);
            if delta.stopped {
                stopped = true;
                break;
            }
            // Released text never ends inside a possible match.
            assert!(!(1..stop.len()).any(|k| out.ends_with(&stop[..k]) && text[out.len()..].starts_with(&stop[k..])), "{stop}: {out:?}");
        }
        if !stopped {
            out.push_str(&stream.finish(&codec).unwrap());
        }
        let expected = text.find(stop).map_or(text, |i| &text[..i]);
        assert_eq!(out, expected, "stop {stop:?}");
        assert_eq!(stopped, text.contains(stop));
    }
}
