//! Speed of the model as run here: prompt processing and greedy generation with a KV cache
//! (batch 1), on the whole model held in memory, plus the process's peak RSS.

use std::time::Instant;

use model::Checkpoint;
use model::engine::Generator;
use serde::Serialize;

use crate::perplexity::EvalError;

/// Prompt-processing and generation throughput.
#[derive(Debug, Clone, Serialize)]
pub struct GenSpeed {
    /// Prompt tokens processed in one forward pass.
    pub prompt_tokens: usize,
    /// Prompt tokens per second.
    pub pp_tokens_per_second: f64,
    /// Tokens generated one at a time.
    pub generated_tokens: usize,
    /// Generated tokens per second.
    pub tg_tokens_per_second: f64,
    /// Seconds for both, model loading excluded.
    pub wall_seconds: f64,
    /// Seconds to load the model.
    pub load_seconds: f64,
    /// Worker threads.
    pub threads: usize,
    /// What the weights are computed in.
    pub compute_dtype: &'static str,
}

/// Measures prompt processing of `prompt` and greedy generation of `n_gen` tokens.
pub fn measure(ckpt: &Checkpoint, prompt: &[u32], n_gen: usize) -> Result<GenSpeed, EvalError> {
    if prompt.is_empty() {
        return Err(EvalError::Input("the speed prompt is empty".into()));
    }
    let t0 = Instant::now();
    let mut g = Generator::open(ckpt, prompt.len() + n_gen + 1)?;
    let load = t0.elapsed().as_secs_f64();
    // One warm-up token so allocation and thread start-up are not timed.
    g.forward(&prompt[..1])?;
    g.reset();
    let t1 = Instant::now();
    let mut logits = g.forward(prompt)?;
    let pp = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    for _ in 0..n_gen {
        let next = model::engine::argmax(&logits);
        logits = g.forward(&[next])?;
    }
    let tg = t2.elapsed().as_secs_f64();
    Ok(GenSpeed {
        prompt_tokens: prompt.len(),
        pp_tokens_per_second: prompt.len() as f64 / pp,
        generated_tokens: n_gen,
        tg_tokens_per_second: if n_gen > 0 { n_gen as f64 / tg } else { 0.0 },
        wall_seconds: pp + tg,
        load_seconds: load,
        threads: rayon::current_num_threads(),
        compute_dtype: "f32 (weights dequantized on load)",
    })
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the OS tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
