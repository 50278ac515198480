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

/// A progress bar with an ETA on stderr: redrawn on a terminal, a plain line every few
/// seconds otherwise (logs, CI).
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
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // Under CI, nohup or a redirect: plain lines instead of a redrawn bar.
        pb.set_draw_target(indicatif::ProgressDrawTarget::term_like_with_hz(
            Box::new(PlainLines(std::sync::Mutex::new(std::time::Instant::now()))),
            1,
        ));
    }
    pb
}

/// Seconds between two progress lines when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: f64 = 5.0;

/// A progress "terminal" for logs: each redraw becomes one plain stderr line, at most one
/// every [`PLAIN_PROGRESS_EVERY`] seconds and none in the first ones (a quick command, or one
/// that fails early, prints only its own lines); cursor movement and clearing are ignored.
#[derive(Debug)]
struct PlainLines(std::sync::Mutex<std::time::Instant>);

impl indicatif::TermLike for PlainLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, line: &str) -> std::io::Result<()> {
        let mut last = self.0.lock().expect("progress lock");
        if last.elapsed().as_secs_f64() >= PLAIN_PROGRESS_EVERY && !line.trim().is_empty() {
            *last = std::time::Instant::now();
            eprintln!("{}", line.trim_end());
        }
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write_line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
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
