//! `compress`: inspect, convert, evaluate, quantize, prune, distill and quantization-aware
//! train decoder-only language models.
//! Every failure prints one line naming the file and the problem and exits with code 2.

mod alloc;
mod calib;
mod convert;
mod distill_args;
mod distill_cache;
mod distill_checkpoints;
mod distill_loop;
mod distill_options;
mod distilling;
mod evaluate;
mod formats;
mod generate;
mod generate_calib;
mod hf_folder;
mod inspect;
mod manifest;
mod output;
mod peft;
mod prune_structured;
mod prune_unstructured;
mod pruning;
mod qat;
mod qat_gguf;
mod qat_init;
mod quant_auto;
mod quant_bnb;
mod quant_gguf;
mod quantize;
mod recipe;
mod recipe_calib;
mod recipe_print;
mod report;
mod report_plot;
mod report_table;
mod requant;
mod run_recipe;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Compress decoder-only language models (quantize, prune, distill, convert) and measure what
/// it costs.
#[derive(Parser, Debug)]
#[command(
    name = "compress",
    version,
    after_help = "Data (WikiText-2, task files): set COMPRESS_DATA to the folder scripts/get-data.sh fills.\nRun `compress <COMMAND> --help` for a command's options."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print the recipe equivalent of this prune, distill, quant, qat or convert command (every
    /// option with its value, defaults included) as TOML, and exit without running it.
    #[arg(long, global = true)]
    print_recipe: bool,
}

impl Cli {
    /// Parses a full command line (program name first); the error is clap's first line.
    pub(crate) fn try_parse_from_args(argv: &[String]) -> Result<Cli, String> {
        Cli::try_parse_from(argv).map_err(|e| clap_error_line(&e))
    }

    /// Whether the command, as given, calibrates on `--calib` (a stage a recipe's
    /// `[calibration]` is given to).
    pub(crate) fn calibrates(&self) -> bool {
        match &self.command {
            Command::Quant(a) => a.calibrates(),
            Command::Prune(a) => a.calibrates(),
            Command::Qat(a) => a.calibrates(),
            _ => false,
        }
    }
}

/// Clap's first line (it names the option), without its `error: `.
pub(crate) fn clap_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid arguments");
    let first = first.trim_start_matches("error: ");
    // A message ending in ':' lists what it means on indented lines (clap's "the following
    // required arguments were not provided:"): keep them on the one line.
    if first.ends_with(':') {
        let items: Vec<&str> = lines
            .take_while(|l| l.starts_with(' '))
            .map(str::trim)
            .collect();
        if !items.is_empty() {
            return format!("{first} {}", items.join(", "));
        }
    }
    first.to_string()
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, config, tensors by type, parameters and size.
    Inspect(inspect::Args),
    /// Write any readable model as an HF folder (config.json, model.safetensors, tokenizer).
    Convert(convert::Args),
    /// Evaluate a model: perplexity (llama.cpp protocol), KL divergence (KLD) from a teacher,
    /// zero-shot tasks (--tasks), speed, energy and size.
    Eval(evaluate::Args),
    /// Post-training quantization (RTN, AWQ, GPTQ, or the bitsandbytes schemes NF4, FP4 and
    /// int8-absmax) of the decoder's linear layers; writes a compressed model (packed, bnb, or
    /// GGUF for a GGUF input) unless --format dense.
    Quant(quantize::Args),
    /// Pruning: unstructured or N:M (magnitude, Wanda, SparseGPT), or structured (heads,
    /// channels, layers) into a smaller model.
    Prune(pruning::Args),
    /// Knowledge distillation (white-box KD: forward/reverse KL, JSD) or plain CE
    /// fine-tuning of a student, e.g. to recover a pruned model.
    Distill(distilling::Args),
    /// Quantization-aware training: the student's linears train behind fake quantization
    /// (scales and zero points from RTN, GPTQ or AWQ, frozen or learned) with a distillation
    /// loss; writes the model on its quantization grid, dense, packed and/or GGUF, with
    /// quant_report.json.
    Qat(qat::Args),
    /// Generate responses to a JSONL file of prompts (greedy or sampled, KV cache) as JSONL
    /// (prompt, response) pairs: training data for black-box distillation.
    Generate(generate::Args),
    /// Compare runs: one table (Markdown, CSV, LaTeX) of size, perplexity, KLD, task accuracy,
    /// speed and energy from their reports, and Pareto plots (SVG) of size against quality.
    Report(report::Args),
    /// Run a recipe (TOML: a teacher, stages prune / distill / quant / qat / export, an
    /// evaluation) into one folder, resuming where an earlier run of it stopped.
    Run(run_recipe::Args),
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

/// Runs a block-by-block stage that writes into `sinks` behind a progress bar of `blocks`
/// steps labelled `label`, then finishes the sinks, so their files are complete on return.
pub(crate) fn drive_sinks<R, E: Into<anyhow::Error>>(
    label: &str,
    blocks: usize,
    mut sinks: Vec<Box<dyn quant::pipeline::OutputSink>>,
    stage: impl FnOnce(
        &mut Vec<Box<dyn quant::pipeline::OutputSink>>,
        &mut dyn FnMut(usize, usize),
    ) -> Result<R, E>,
) -> anyhow::Result<R> {
    let pb = progress_bar(label, blocks as u64);
    let report = stage(&mut sinks, &mut |d, _| pb.set_position(d as u64)).map_err(Into::into)?;
    for s in sinks {
        s.finish()?;
    }
    pb.finish_and_clear();
    Ok(report)
}

/// A progress bar on stderr: redrawn on a terminal, a plain line every few seconds otherwise
/// (logs, CI). Its ETA appears only once there is evidence for it (see [`eta_text`]).
pub(crate) fn progress_bar(msg: &str, total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise}{late_eta}",
        )
        .expect("valid template")
        .with_key(
            "late_eta",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                if let Some(t) = eta_text(s.pos(), s.len().unwrap_or(0), s.elapsed()) {
                    let _ = write!(w, " eta {t}");
                }
            },
        )
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

/// Steps and seconds of evidence before an ETA is shown.
const ETA_MIN_STEPS: u64 = 2;
const ETA_MIN_SECS: f64 = 3.0;

/// The remaining time as the mean pace so far predicts it, or `None` while there is too
/// little evidence (fewer than [`ETA_MIN_STEPS`] steps or [`ETA_MIN_SECS`] seconds: the first
/// steps of a job are often unlike the rest) or nothing remains.
pub(crate) fn eta_text(pos: u64, len: u64, elapsed: std::time::Duration) -> Option<String> {
    let secs = elapsed.as_secs_f64();
    if pos < ETA_MIN_STEPS || secs < ETA_MIN_SECS || pos >= len {
        return None;
    }
    let left = (secs * (len - pos) as f64 / pos as f64).round() as u64;
    Some(match left {
        0..60 => format!("{left}s"),
        60..3600 => format!("{}m{:02}s", left / 60, left % 60),
        _ => format!("{}h{:02}m", left / 3600, left % 3600 / 60),
    })
}

/// `n` with its digits in groups of three (`134,515,008`), for human-readable output.
pub(crate) fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An error's message and causes joined by `: `, each cause left out when the text so far
/// already contains it (a library error that prints its source, which anyhow lists again).
fn error_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.is_empty() {
            msg = c;
        } else if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg.replace('\n', " ")
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

/// Set while [`check`] runs a command: it stops at [`checks_done`].
static CHECK_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a command is only being checked and stops here: each stage command (and `eval`,
/// `generate`) asks right after its option checks, before it opens a model or writes, so
/// `compress run` refuses an option of a recipe's last stage before its first stage runs.
pub(crate) fn checks_done() -> bool {
    CHECK_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs only the option checks of a stage's (or `eval`'s, `generate`'s) command line.
pub(crate) fn check(cli: Cli) -> anyhow::Result<()> {
    debug_assert!(matches!(
        cli.command,
        Command::Convert(_)
            | Command::Eval(_)
            | Command::Quant(_)
            | Command::Prune(_)
            | Command::Distill(_)
            | Command::Qat(_)
            | Command::Generate(_)
    ));
    CHECK_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = run(cli);
    CHECK_ONLY.store(false, std::sync::atomic::Ordering::Relaxed);
    result
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Eval(a) => evaluate::run(a),
        Command::Quant(a) => quantize::run(a),
        Command::Prune(a) => pruning::run(a),
        Command::Distill(a) => distilling::run(a),
        Command::Qat(a) => qat::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Report(a) => report::run(a),
        Command::Run(a) => run_recipe::run(a),
    }
}

fn main() {
    output::install_signal_handlers();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, as every other error: clap's first line (it names the option).
            eprintln!("error: {}", clap_error_line(&e));
            std::process::exit(2);
        }
    };
    if cli.print_recipe {
        let argv: Vec<String> = std::env::args().filter(|a| a != "--print-recipe").collect();
        match recipe::print(&argv) {
            Ok(t) => print!("{t}"),
            Err(e) => {
                eprintln!("error: --print-recipe: {}", error_line(&e));
                std::process::exit(2);
            }
        }
        return;
    }
    if let Err(e) = run(cli) {
        // One line: the chain of contexts joined, newlines flattened.
        eprintln!("error: {}", error_line(&e));
        std::process::exit(2);
    }
}

/// Paths the commands accept.
pub(crate) type Path = PathBuf;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn eta_waits_for_evidence() {
        // One step after 0.5 s of a 600-step job: no guess ("eta 5m" for a 5 s job).
        assert_eq!(eta_text(1, 600, Duration::from_millis(500)), None);
        assert_eq!(eta_text(300, 600, Duration::from_secs(1)), None);
        assert_eq!(eta_text(1, 600, Duration::from_secs(10)), None);
        assert_eq!(eta_text(600, 600, Duration::from_secs(10)), None);
        assert_eq!(
            eta_text(300, 600, Duration::from_secs(4)).as_deref(),
            Some("4s")
        );
        assert_eq!(
            eta_text(10, 100, Duration::from_secs(10)).as_deref(),
            Some("1m30s")
        );
    }

    #[test]
    fn digits_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(134_515_008), "134,515,008");
    }

    #[test]
    fn a_cause_printed_twice_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io)
            .context("x.gguf: No such file")
            .context("cannot open model");
        assert_eq!(error_line(&e), "cannot open model: x.gguf: No such file");
    }
}
