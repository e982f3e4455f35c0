//! `lorac run` and `lorac serve` end to end on the tiny llama (wgpu; lavapipe in CI): compile a
//! plan with the binary, generate with an adapter and compare with the HF + PEFT reference,
//! serve over real HTTP and stop on SIGTERM, and refuse bad input with one clear line.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn lorac(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lorac")).args(args).env("XDG_RUNTIME_DIR", "/tmp").output().expect("lorac runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn compile_plan(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("lorac-serve-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.bin");
    let model = common::tiny("llama");
    let (ok, _, stderr) = lorac(&[
        "compile",
        model.to_str().unwrap(),
        "--lora-target-modules",
        "all",
        "--max-loras",
        "4",
        "--max-seqs",
        "8",
        "--max-batch-tokens",
        "64",
        "--kv-cache-tokens",
        "1024",
        "-o",
        plan.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    (dir, plan)
}

fn reference_row(i: usize) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(common::tiny("llama").join("reference.json")).unwrap()).unwrap();
    json["rows"][i].clone()
}

fn adapter_arg(name: &str) -> String {
    format!("{name}={}", common::tiny("llama").join("adapters").join(name).display())
}

#[test]
fn run_generates_the_reference_continuation() {
    let (dir, plan) = compile_plan("run");
    let row = reference_row(0);
    assert_eq!(row["adapter"], "A");
    let a = adapter_arg("A");
    let (ok, stdout, stderr) = lorac(&[
        "run",
        plan.to_str().unwrap(),
        "--device",
        "wgpu",
        "--lora",
        &a,
        "--adapter",
        "A",
        "--prompt",
        row["prompt"].as_str().unwrap(),
        "--max-tokens",
        "8",
        "--ignore-eos",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.strip_suffix('\n').unwrap(), row["generated_text"].as_str().unwrap(), "stderr: {stderr}");
    assert!(stderr.contains("8 generated") && stderr.contains("finish reason: length"), "{stderr}");

    // Chat through the template, base model, sampling with a seed: reproducible.
    let chat = |seed: &str| {
        lorac(&[
            "run",
            plan.to_str().unwrap(),
            "--device",
            "wgpu",
            "--chat",
            "--prompt",
            "Hello, world!",
            "--max-tokens",
            "6",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--ignore-eos",
        ])
    };
    let (ok, first, stderr) = chat("7");
    assert!(ok, "{stderr}");
    assert_eq!(chat("7").1, first);
    assert!(stderr.contains("6 generated"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_and_serve_refuse_bad_input_in_one_line() {
    let (dir, plan) = compile_plan("bad");
    let plan = plan.to_str().unwrap();
    let bad_adapter = format!("bad={}", common::tiny("llama").join("bad_adapters/dora").display());
    let a = adapter_arg("A");
    for (args, expected) in [
        (vec!["run", plan, "--prompt", "hi", "--adapter", "A"], "--adapter A: no --lora A=PATH was given"),
        (vec!["run", plan, "--prompt", "hi", "--lora", "A"], "--lora `A` is not NAME=PATH"),
        (vec!["run", plan, "--prompt", "hi", "--lora", &a, "--lora", &a], "given twice"),
        (vec!["run", plan, "--prompt", "hi", "--top-p", "0"], "--top-p 0: must be in (0, 1]"),
        (vec!["run", "/nonexistent/plan.bin", "--prompt", "hi"], "cannot read /nonexistent/plan.bin"),
        (vec!["run", plan, "--prompt", "hi", "--model", "/nonexistent"], "--model /nonexistent: not a directory"),
        (vec!["run", plan, "--device", "wgpu", "--prompt", "hi", "--lora", &bad_adapter], "adapter `bad`"),
        (vec!["serve", plan, "--device", "wgpu", "--port", "0", "--lora", &bad_adapter], "DoRA"),
    ] {
        let (ok, _, stderr) = lorac(&args);
        assert!(!ok, "{args:?} succeeded");
        let line = stderr.lines().rfind(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{args:?}: no error line in {stderr}"));
        assert!(line.contains(expected), "{args:?}: {line}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// POSTs `body` over a fresh connection; the response's status line and body.
fn http_post(port: u16, path: &str, body: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

#[test]
fn serve_answers_http_and_stops_on_sigterm() {
    let (dir, plan) = compile_plan("serve");
    let a = adapter_arg("A");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorac"))
        .args(["serve", plan.to_str().unwrap(), "--device", "wgpu", "--port", "0", "--lora", &a])
        .env("XDG_RUNTIME_DIR", "/tmp")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let port = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("lorac serve exited: {log}");
        }
        log.push_str(&line);
        if let Some(rest) = line.split("on http://127.0.0.1:").nth(1) {
            break rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u16>().unwrap();
        }
    };
    let row = reference_row(0);
    let body =
        serde_json::json!({"model": "A", "prompt": row["prompt"], "max_tokens": 8, "temperature": 0, "ignore_eos": true}).to_string();
    let (status, body) = http_post(port, "/v1/completions", &body);
    assert!(status.contains("200"), "{status}: {body}");
    let value: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(value["choices"][0]["text"], row["generated_text"]);
    let (status, _) = http_post(port, "/v1/completions", r#"{"model": "nope", "prompt": "x"}"#);
    assert!(status.contains("404"), "{status}");

    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "exit {status:?}: {log}{rest}");
    assert!(rest.contains("shutdown requested"), "{rest}");
    let _ = Path::new(&dir);
    std::fs::remove_dir_all(&dir).ok();
}
