//! `compress generate MODEL --prompts FILE --out FILE.jsonl`: the model's responses to a JSONL
//! file of prompts (greedy, or sampled with temperature and nucleus truncation), written as
//! JSONL (prompt, response) pairs: the training data of black-box distillation.
//! `compress generate MODEL --calib N --out FILE.json`: N sequences sampled from BOS, the
//! data-free calibration set (`generate_calib`).

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, bail};
use model::Checkpoint;
use model::engine::{Generator, argmax};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::output::{TempGuard, check_output_file, commit, temp_sibling};

/// Most tokens one response may have.
const MAX_NEW_TOKENS: usize = 1_000_000;

/// Highest temperature accepted (beyond it sampling is uniform noise).
const MAX_TEMPERATURE: f64 = 100.0;

/// Nucleus mass when --top-p is not given.
const DEFAULT_TOP_P: f64 = 0.9;

/// Arguments of `generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to generate with: an HF folder or a .gguf file.
    pub(crate) model: crate::Path,
    /// JSONL file, one object per line with a string field `prompt` (other fields ignored,
    /// blank lines skipped). One of --prompts and --calib is needed.
    #[arg(long, required_unless_present = "calib", conflicts_with = "calib")]
    prompts: Option<crate::Path>,
    /// Data-free calibration: sample N sequences of --calib-len tokens from BOS (EOS is never
    /// drawn) and write their token ids to --out as JSON (a list of token-id lists, what
    /// `--calib FILE.json` reads) and their text beside it (FILE.txt) for inspection.
    #[arg(long, value_name = "N")]
    pub(crate) calib: Option<usize>,
    /// --calib: tokens per sequence, BOS included [default: 512].
    #[arg(long)]
    pub(crate) calib_len: Option<usize>,
    /// Output JSONL file: one line per prompt with `prompt`, `response`, `prompt_tokens` (BOS
    /// included when the tokenizer adds one), `response_tokens` (EOS not included) and `stop`
    /// ("eos" or "length"). With --calib: a .json file of token ids.
    #[arg(long)]
    pub(crate) out: crate::Path,
    /// --prompts: most tokens generated per prompt (the EOS token ends a response earlier)
    /// [default: 128].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Softmax temperature; 0 is greedy decoding [default: 0.7 for --prompts, 1.0 for
    /// --calib: a sample of the model's own distribution].
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) temperature: Option<f64>,
    /// Nucleus sampling: sample among the most probable tokens whose mass reaches p, in
    /// (0, 1] [default: 0.9 for --prompts, 0.95 for --calib; does not apply to --temperature 0].
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) top_p: Option<f64>,
    /// Seed of the sampling: prompt (or sequence) i depends only on the seed, i and the model.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Replace an existing --out.
    #[arg(long)]
    pub(crate) force: bool,
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sampling {
    /// The most probable token (the lowest id among equals).
    Greedy,
    /// Drawn from softmax(logits / temperature) cut to the top-p nucleus.
    Nucleus { temperature: f64, top_p: f64 },
}

/// One output line.
#[derive(Serialize)]
struct Record<'a> {
    prompt: &'a str,
    response: String,
    prompt_tokens: usize,
    response_tokens: usize,
    stop: &'static str,
}

/// The sampling `temperature` and `top_p` describe (`default_top_p` when not given); values
/// out of range are refused.
pub(crate) fn sampling(t: f64, top_p: Option<f64>, default_top_p: f64) -> anyhow::Result<Sampling> {
    if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
        bail!("--temperature must be in [0, {MAX_TEMPERATURE}] (0: greedy), got {t}");
    }
    if t == 0.0 {
        if let Some(p) = top_p {
            bail!("--top-p {p} does not apply to --temperature 0 (greedy decoding)");
        }
        return Ok(Sampling::Greedy);
    }
    let p = top_p.unwrap_or(default_top_p);
    if !(p > 0.0 && p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {p}");
    }
    Ok(Sampling::Nucleus {
        temperature: t,
        top_p: p,
    })
}

/// Runs `generate`: checks every option and input, then writes all responses or nothing.
pub fn run(a: Args) -> anyhow::Result<()> {
    crate::set_threads(a.threads);
    let Some(prompt_file) = a.prompts.clone() else {
        if a.max_new_tokens.is_some() {
            bail!(
                "--max-new-tokens does not apply to --calib (each sequence has --calib-len tokens)"
            );
        }
        return crate::generate_calib::run(&a);
    };
    if a.calib_len.is_some() {
        bail!("--calib-len needs --calib N");
    }
    let start = Instant::now();
    let max_new_tokens = a.max_new_tokens.unwrap_or(128);
    if max_new_tokens == 0 || max_new_tokens > MAX_NEW_TOKENS {
        bail!("--max-new-tokens must be in 1..={MAX_NEW_TOKENS}, got {max_new_tokens}");
    }
    let sampling = sampling(a.temperature.unwrap_or(0.7), a.top_p, DEFAULT_TOP_P)?;
    if crate::checks_done() {
        return Ok(());
    }
    check_output_file(&a.out, "--out", &[&a.model, &prompt_file], a.force)?;
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;
    let prompts = distill::pairs::read_prompts(&prompt_file)?;
    let inputs = prompt_ids(&prompt_file, max_new_tokens, &ckpt, &tok, &prompts)?;
    let eos = eos_ids(&ckpt);
    let max_len = inputs.iter().map(Vec::len).max().unwrap_or(0) + max_new_tokens;
    let mut generator = Generator::open(&ckpt, max_len).context("cannot load the model")?;

    let tmp = temp_sibling(&a.out);
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?,
    );
    let pb = crate::progress_bar("generate", prompts.len() as u64);
    let (mut new_tokens, mut eos_stops) = (0u64, 0usize);
    for (i, ((line, prompt), ids)) in prompts.iter().zip(&inputs).enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
        rng.set_stream(i as u64);
        let (out, stop) = respond(
            &mut generator,
            ids,
            max_new_tokens,
            sampling,
            &eos,
            &mut rng,
        )
        .with_context(|| format!("{}: line {line}", prompt_file.display()))?;
        new_tokens += out.len() as u64;
        eos_stops += usize::from(stop == "eos");
        let rec = Record {
            prompt,
            response: tok.decode(&out).context("cannot decode a response")?,
            prompt_tokens: ids.len(),
            response_tokens: out.len(),
            stop,
        };
        serde_json::to_writer(&mut w, &rec)?;
        writeln!(w)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all().map(|_| f))
        .with_context(|| format!("{}", tmp.display()))?;
    commit(&tmp, &a.out)?;
    guard.0 = None;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "generated {} responses ({} tokens, {} ended by EOS) in {:.1} s ({:.1} tok/s) -> {}",
        crate::grouped(prompts.len() as u64),
        crate::grouped(new_tokens),
        crate::grouped(eos_stops as u64),
        secs,
        new_tokens as f64 / secs,
        a.out.display()
    );
    Ok(())
}

/// The model's end-of-sequence ids.
pub(crate) fn eos_ids(ckpt: &Checkpoint) -> Vec<u32> {
    match &ckpt.config().eos_token_id {
        Some(model::config::TokenIds::One(id)) => vec![*id],
        Some(model::config::TokenIds::Many(ids)) => ids.clone(),
        None => Vec::new(),
    }
}

/// The token ids of every prompt (BOS first when the tokenizer adds it), each checked to
/// leave room for --max-new-tokens in the model's context.
fn prompt_ids(
    file: &std::path::Path,
    max_new_tokens: usize,
    ckpt: &Checkpoint,
    tok: &model::Tokenizer,
    prompts: &[(usize, String)],
) -> anyhow::Result<Vec<Vec<u32>>> {
    let ctx = ckpt.config().max_position_embeddings;
    let file = file.display();
    prompts
        .iter()
        .map(|(line, p)| {
            let mut ids: Vec<u32> = match tok.bos_id {
                Some(b) if tok.add_bos => vec![b],
                _ => Vec::new(),
            };
            ids.extend(
                tok.encode(p)
                    .with_context(|| format!("{file}: line {line}: cannot tokenize the prompt"))?,
            );
            if ids.is_empty() {
                bail!("{file}: line {line}: the prompt has no tokens");
            }
            if ids.len() + max_new_tokens > ctx {
                bail!(
                    "{file}: line {line}: {} prompt tokens + --max-new-tokens {max_new_tokens} exceed the model's context of {ctx} tokens",
                    ids.len(),
                );
            }
            Ok(ids)
        })
        .collect()
}

/// Generates after `prompt` until an `eos` token (left out of the response) or `max_new`
/// tokens; returns the response's ids and why it stopped.
fn respond(
    g: &mut Generator,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: &[u32],
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<(Vec<u32>, &'static str)> {
    g.reset();
    let mut logits = g.forward(prompt)?;
    let mut out = Vec::new();
    for step in 0..max_new {
        let next = next_token(&logits, sampling, rng)
            .with_context(|| format!("after {step} generated tokens"))?;
        if eos.contains(&next) {
            return Ok((out, "eos"));
        }
        out.push(next);
        if step + 1 < max_new {
            logits = g.forward(&[next])?;
        }
    }
    Ok((out, "length"))
}

/// The next token after `logits` (refused when they are not finite).
pub(crate) fn next_token(
    logits: &[f32],
    sampling: Sampling,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<u32> {
    if logits.iter().any(|&x| x.is_nan() || x == f32::INFINITY)
        || logits.iter().all(|&x| x == f32::NEG_INFINITY)
    {
        bail!("the model's logits are not finite");
    }
    Ok(match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Nucleus { temperature, top_p } => {
            sample_nucleus(logits, temperature, top_p, rng.random::<f64>())
        }
    })
}

/// Draws a token from softmax(logits / temperature) (in f64) cut to its nucleus: the fewest
/// most probable tokens (the lower id first among equals) whose mass reaches `top_p`,
/// renormalized. `u` is uniform in [0, 1). Logits are not NaN and not +inf.
fn sample_nucleus(logits: &[f32], temperature: f64, top_p: f64, u: f64) -> u32 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| ((x as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // Only tokens above a weight floor are sorted when they already hold the nucleus's mass:
    // every other token weighs less than each of them, so the nucleus (a prefix of the full
    // order) lies among them and comes out the same. Sorting the whole vocabulary for every
    // sampled token was a fifth of batched generation's time, and the 1e-7 floor alone still
    // left 8% in sorting: the higher floors are tried first (a filter pass each is cheap).
    let mut order: Vec<u32> = Vec::with_capacity(logits.len());
    let mut held = false;
    for rel in [1e-3, 1e-5, 1e-7] {
        let floor = total * rel;
        order.clear();
        order.extend((0..logits.len() as u32).filter(|&i| weights[i as usize] >= floor));
        let heavy: f64 = order.iter().map(|&i| weights[i as usize]).sum();
        if heavy >= top_p * total * (1.0 + 1e-9) {
            held = true;
            break;
        }
    }
    if !held {
        order = (0..logits.len() as u32).collect();
    }
    order.sort_unstable_by(|&i, &j| {
        weights[j as usize]
            .total_cmp(&weights[i as usize])
            .then(i.cmp(&j))
    });
    // The nucleus: a prefix of `order` holding at least top_p of the mass.
    let mut kept = 0.0;
    let mut n = 0;
    for &i in &order {
        kept += weights[i as usize];
        n += 1;
        if kept >= top_p * total {
            break;
        }
    }
    let target = u * kept;
    let mut acc = 0.0;
    for &i in &order[..n] {
        acc += weights[i as usize];
        if acc > target {
            return i;
        }
    }
    // Rounding left `target` at the very top: the last token with any weight.
    order[..n]
        .iter()
        .rev()
        .copied()
        .find(|&i| weights[i as usize] > 0.0)
        .unwrap_or(order[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nucleus_keeps_the_fewest_tokens_that_reach_p() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1 (ids 2, 0, 1).
        let logits: Vec<f32> = [0.3f64, 0.2, 0.5].iter().map(|p| p.ln() as f32).collect();
        let draw = |p: f64, u: f64| sample_nucleus(&logits, 1.0, p, u);
        // p = 0.4: only the top token; p = 0.75: the top two, renormalized (5/8, 3/8).
        for u in [0.0, 0.3, 0.999] {
            assert_eq!(draw(0.4, u), 2);
            assert_eq!(draw(1e-9, u), 2);
        }
        assert_eq!(draw(0.75, 0.6), 2);
        assert_eq!(draw(0.75, 0.63), 0);
        assert_eq!(draw(0.75, 0.999), 0);
        // p = 1: every token; the last fifth of u is id 1.
        assert_eq!(draw(1.0, 0.79), 0);
        assert_eq!(draw(1.0, 0.81), 1);
    }

    #[test]
    fn ties_go_to_the_lower_id_as_argmax() {
        let logits = [1.0f32, 3.0, 3.0, -2.0];
        assert_eq!(sample_nucleus(&logits, 0.7, 1e-6, 0.99), argmax(&logits));
        assert_eq!(sample_nucleus(&logits, 0.7, 1e-6, 0.99), 1);
        // -inf logits are never drawn.
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(sample_nucleus(&logits, 1.0, 1.0, u), 1);
        }
    }

    /// The draw over the few heavy tokens equals the draw over the whole sorted vocabulary.
    #[test]
    fn sorting_only_the_heavy_tokens_draws_the_same() {
        fn full(logits: &[f32], temperature: f64, top_p: f64, u: f64) -> u32 {
            let max = logits
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let w: Vec<f64> = logits
                .iter()
                .map(|&x| ((x as f64 - max) / temperature).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            order.sort_by(|&i, &j| w[j as usize].total_cmp(&w[i as usize]).then(i.cmp(&j)));
            let (mut kept, mut n) = (0.0, 0);
            for &i in &order {
                kept += w[i as usize];
                n += 1;
                if kept >= top_p * total {
                    break;
                }
            }
            let mut acc = 0.0;
            for &i in &order[..n] {
                acc += w[i as usize];
                if acc > u * kept {
                    return i;
                }
            }
            order[n - 1]
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let spread = [1.0f32, 4.0, 12.0][case % 3];
            let logits: Vec<f32> = (0..5000).map(|_| rng.random::<f32>() * spread).collect();
            let (t, p, u) = (
                0.5 + rng.random::<f64>(),
                rng.random::<f64>(),
                rng.random::<f64>(),
            );
            assert_eq!(
                sample_nucleus(&logits, t, p, u),
                full(&logits, t, p, u),
                "case {case}"
            );
        }
    }
}
