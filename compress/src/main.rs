//! `compress`: inspect, convert and evaluate decoder-only language models.
//! Every failure prints one line naming the file and the problem and exits with code 2.

mod calib;
mod convert;
mod evaluate;
mod hf_folder;
mod inspect;
mod output;
mod prune_structured;
mod prune_unstructured;
mod pruning;
mod quantize;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Compress decoder-only language models and measure what it costs.
#[derive(Parser, Debug)]
#[command(name = "compress", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, config, tensors by type, parameters and size.
    Inspect(inspect::Args),
    /// Write any readable model as an HF folder (config.json, model.safetensors, tokenizer).
    Convert(convert::Args),
    /// Evaluate a model: perplexity (llama.cpp protocol), size and speed.
    Eval(evaluate::Args),
    /// Post-training quantization (RTN, AWQ, GPTQ) of the decoder's linear layers.
    Quant(quantize::Args),
    /// Pruning: unstructured or N:M (magnitude, Wanda, SparseGPT), or structured (heads,
    /// channels, layers) into a smaller model.
    Prune(pruning::Args),
}

/// Sets the worker thread count for all parallel work.
pub(crate) fn set_threads(n: Option<usize>) -> usize {
    if let Some(n) = n {
        // Only the first call can set the global pool; later calls keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    rayon::current_num_threads()
}

/// A progress bar with an ETA, drawn on stderr only when it is a terminal.
pub(crate) fn progress_bar(msg: &str, total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Eval(a) => evaluate::run(a),
        Command::Quant(a) => quantize::run(a),
        Command::Prune(a) => pruning::run(a),
    }
}

fn main() {
    output::install_signal_handlers();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, as every other error: clap's first line (it names the option).
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("error: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        // One line: the chain of contexts joined, newlines flattened.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(2);
    }
}

/// Paths the commands accept.
pub(crate) type Path = PathBuf;
