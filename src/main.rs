//! `lorac`: compile a Hugging Face model for multi-LoRA serving and look at the result.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lorac", version, about = "Ahead-of-time compiler and server for multi-LoRA LLM serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a model directory (config.json, optional safetensors) into plan.bin.
    Compile(commands::compile::Args),
    /// Show a plan: LoRA buffer shapes per rank, kernels, memory.
    Inspect(commands::inspect::Args),
    /// Show one layer of a plan's dataflow graph.
    Graph(commands::graph::Args),
    /// Serve a plan over an OpenAI-compatible HTTP API (continuous batching, multi-LoRA).
    Serve(commands::serve::Args),
    /// Generate one completion from a plan and print it.
    Run(commands::run::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile(args) => commands::compile::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Graph(args) => commands::graph::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Run(args) => commands::run::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
