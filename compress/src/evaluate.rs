//! `compress eval MODEL --ppl FILE`: perplexity, size and speed, as a table and JSON.

use anyhow::{Context, bail};
use comfy_table::Table;
use eval::{PplOptions, Protocol, SizeReport, SpeedReport};
use model::Checkpoint;
use serde_json::json;

use crate::output::write_atomic;

/// Arguments of `eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file.
    model: crate::Path,
    /// Text file for perplexity (e.g. wikitext-2 wiki.test.raw).
    #[arg(long)]
    ppl: Option<crate::Path>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks (default: all).
    #[arg(long)]
    chunks: Option<usize>,
    /// `llama` (llama.cpp's llama-perplexity: second half of each chunk scored) or `hf`
    /// (every token scored, as in the AWQ/GPTQ papers).
    #[arg(long, default_value = "llama", value_parser = ["llama", "hf"])]
    protocol: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<crate::Path>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let threads = crate::set_threads(a.threads);
    let Some(ppl_path) = a.ppl.as_ref() else {
        bail!("nothing to evaluate: give --ppl TEXT_FILE");
    };
    if a.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;
    let bytes = std::fs::read(ppl_path).with_context(|| format!("{}", ppl_path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", ppl_path.display()))?;
    let tokens = tok.encode(&text)?;
    let opts = PplOptions {
        ctx: a.ctx,
        chunks: a.chunks,
        protocol: if a.protocol == "hf" { Protocol::Hf } else { Protocol::Llama },
    };
    let pb = crate::progress_bar("perplexity", 1);
    let res = eval::perplexity(&ckpt, &tok, &tokens, &opts, model::default_device(), |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })
    .map_err(|e| anyhow::anyhow!("{}: {e}", ppl_path.display()))?;
    pb.finish_and_clear();
    let size = SizeReport::of(&ckpt);
    let speed = SpeedReport {
        tokens_per_second: res.tokens_processed as f64 / res.wall_seconds,
        wall_seconds: res.wall_seconds,
        threads,
    };
    let mut t = Table::new();
    t.set_header(vec!["model", "ppl", "± stderr", "chunks x ctx", "tok/s", "bytes", "bpw"]);
    t.add_row(vec![
        a.model.display().to_string(),
        format!("{:.4}", res.value),
        format!("{:.4}", res.stderr),
        format!("{} x {}", res.chunks, res.ctx),
        format!("{:.1}", speed.tokens_per_second),
        size.bytes.to_string(),
        format!("{:.3}", size.bits_per_weight),
    ]);
    println!("{t}");
    if let Some(out) = &a.json {
        let v = json!({
            "model": a.model, "format": ckpt.format(), "text": ppl_path,
            "perplexity": res, "speed": speed, "size": size,
        });
        write_atomic(out, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}
