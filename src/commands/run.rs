//! `lorac run plan.bin --prompt "..."`: one generation, printed as it is produced.

use std::io::Write;
use std::time::Instant;

use lorac_server::sampling::SamplingParams;
use lorac_server::text::ChatMessage;
use lorac_server::{Event, Request, StartOptions};

use super::engine::EngineArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long)]
    prompt: String,
    /// Generate with this adapter (a --lora name); the base model when absent.
    #[arg(long)]
    adapter: Option<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

pub fn run(args: Args) -> Result<(), String> {
    super::engine::init_logging("warn");
    let super::engine::Resolved { plan, model_dir, adapters } = args.engine.resolve()?;
    if let Some(adapter) = args.adapter.as_ref().filter(|a| !adapters.iter().any(|(name, _)| name == *a)) {
        return Err(format!("--adapter {adapter}: no --lora {adapter}=PATH was given"));
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!("--temperature {}: must be 0 or more", args.temperature));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!("--top-p {}: must be in (0, 1]", args.top_p));
    }
    if args.max_tokens == 0 {
        return Err("--max-tokens: must be at least 1".into());
    }
    let options = StartOptions {
        model_dir,
        device: args.engine.device.into(),
        served_model_name: None,
        adapters,
        max_queue: 1,
        max_model_len: args.engine.max_model_len,
        on_load: None,
    };
    let (state, _device) = super::engine::start_with_progress(plan, options)?;
    let scheduler = state.scheduler.clone();
    let result = generate(&args, &state);
    scheduler.shutdown(std::time::Duration::ZERO);
    scheduler.join();
    result
}

fn generate(args: &Args, state: &lorac_server::AppState) -> Result<(), String> {
    let codec = &state.codec;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage { role: "system".into(), content: system.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: args.prompt.clone() });
        codec.encode_chat(&messages)
    } else {
        codec.encode(&args.prompt, true)
    }
    .map_err(|e| e.message)?;
    let model = args.adapter.clone().unwrap_or_else(|| state.scheduler.info().served_model_name.clone());
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..SamplingParams::greedy(args.max_tokens)
    };
    let started = Instant::now();
    let mut events = state.scheduler.submit(Request { model, prompt, params }).map_err(|e| e.message)?;
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Delta { text, .. } => {
                // A closed stdout (`| head`) ends the generation quietly.
                if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                    return Ok(());
                }
            }
            Event::Done { finish_reason, usage } => {
                let _ = writeln!(stdout);
                let seconds = started.elapsed().as_secs_f64();
                eprintln!(
                    "[{} prompt tokens, {} generated in {seconds:.2} s ({:.1} tokens/s), finish reason: {}]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    f64::from(usage.completion_tokens) / seconds.max(1e-9),
                    finish_reason.as_str()
                );
                return Ok(());
            }
            Event::Error(e) => return Err(e.message),
        }
    }
    Err("the scheduler stopped before the generation ended".into())
}
