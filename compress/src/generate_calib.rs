//! Data-free calibration (`compress generate MODEL --calib N --out FILE.json`): the model
//! samples N sequences of --calib-len tokens from its BOS token, so that GPTQ, AWQ or a pruning
//! method can calibrate without any user text (LLM-QAT's data-free generation; DFQ's aim). An
//! end-of-sequence token does not end a sequence: it is kept and sampling goes on, as documents
//! are packed in pretraining and chat turns follow each other. The token ids are written as
//! JSON (a list of token-id lists: what `--calib FILE.json` reads, and what `--dump-calib`
//! writes) and their decoded text beside it (FILE.txt, sequences separated by a line of `=`),
//! so the data can be inspected.

use std::time::Instant;

use anyhow::{Context, bail};
use model::Checkpoint;
use model::engine::Generator;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::generate::{Args, Sampling, next_token, sampling};
use crate::output::{check_output_file, write_atomic};

/// Most sequences one call may ask for.
const MAX_SEQUENCES: usize = 1_000_000;

/// Runs `generate --calib N`: checks every option, samples, then writes both files or neither.
pub(crate) fn run(a: &Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let n = a.calib.expect("called for --calib");
    if n == 0 || n > MAX_SEQUENCES {
        bail!("--calib must be in 1..={MAX_SEQUENCES}, got {n}");
    }
    let len = a.calib_len.unwrap_or(512);
    if len < 2 {
        bail!("--calib-len must be at least 2 (BOS and one sampled token), got {len}");
    }
    if a.out.extension().and_then(|e| e.to_str()) != Some("json") {
        bail!(
            "--out {}: with --calib the output is a .json file of token ids",
            a.out.display()
        );
    }
    let text_out = a.out.with_extension("txt");
    let sampling = sampling(a.temperature.unwrap_or(1.0), a.top_p, 0.95)?;
    if crate::checks_done() {
        return Ok(());
    }
    check_output_file(&a.out, "--out", &[&a.model], a.force)?;
    check_output_file(&text_out, "--out (its .txt)", &[&a.model], a.force)?;
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;
    let ctx = ckpt.config().max_position_embeddings;
    if len > ctx {
        bail!("--calib-len {len} exceeds the model's context of {ctx} tokens");
    }
    let from_config = match &ckpt.config().bos_token_id {
        Some(model::config::TokenIds::One(id)) => Some(*id),
        Some(model::config::TokenIds::Many(ids)) => ids.first().copied(),
        None => None,
    };
    let Some(bos) = tok.bos_id.or(from_config) else {
        bail!(
            "{}: the model has no BOS token to start from; give --prompts FILE instead",
            a.model.display()
        );
    };
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let mut g = Generator::open(&ckpt, len).context("cannot load the model")?;
    let pb = crate::progress_bar("generate", n as u64);
    let mut sequences = Vec::with_capacity(n);
    for first in (0..n).step_by(BATCH) {
        let ids: Vec<usize> = (first..n.min(first + BATCH)).collect();
        let batch = sample(&mut g, bos, len, sampling, a.seed, &ids)
            .with_context(|| format!("sequences {first}..{}", first + ids.len()))?;
        pb.inc(batch.len() as u64);
        sequences.extend(batch);
    }
    let mut text = String::new();
    for (i, seq) in sequences.iter().enumerate() {
        if i > 0 {
            text.push_str("\n==========\n");
        }
        text.push_str(&tok.decode(seq).context("cannot decode a sequence")?);
    }
    pb.finish_and_clear();
    // The text first: the .json is what a stage reads, so it appears last.
    write_atomic(&text_out, text.as_bytes())?;
    write_atomic(&a.out, serde_json::to_string(&sequences)?.as_bytes())?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "generated {} calibration sequences of {len} tokens in {secs:.1} s ({:.1} tok/s) -> {} (text: {})",
        crate::grouped(n as u64),
        (n * (len - 1)) as f64 / secs,
        a.out.display(),
        text_out.display()
    );
    Ok(())
}

/// Sequences decoded together (their KV caches side by side): enough to amortize a pass over
/// the weights, few enough that the caches of a 7B model stay small (32 x 512 tokens of
/// Llama-2-7B's f32 cache: 16 GiB; GQA models such as Mistral-7B: 4 GiB).
const BATCH: usize = 32;

/// The sequences numbered `ids`, `len` tokens each: `bos`, then `len - 1` sampled ones.
/// Sequence `i` draws from its own stream of the seeded generator, so it does not depend on
/// the other sequences.
fn sample(
    g: &mut Generator,
    bos: u32,
    len: usize,
    sampling: Sampling,
    seed: u64,
    ids: &[usize],
) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut rngs: Vec<ChaCha8Rng> = ids
        .iter()
        .map(|&i| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    g.reset();
    let mut seqs: Vec<Vec<u32>> = ids.iter().map(|_| vec![bos]).collect();
    let mut logits = g.forward_batch(&vec![bos; ids.len()])?;
    let vocab = logits.len() / ids.len();
    for step in 1..len {
        // Each sequence draws from its own stream, so drawing them in parallel changes nothing.
        let next = seqs
            .par_iter_mut()
            .zip(rngs.par_iter_mut())
            .zip(logits.par_chunks(vocab))
            .map(|((seq, rng), row)| {
                let t = next_token(row, sampling, rng)
                    .with_context(|| format!("after {step} tokens"))?;
                seq.push(t);
                Ok(t)
            })
            .collect::<anyhow::Result<Vec<u32>>>()?;
        if step + 1 < len {
            logits = g.forward_batch(&next)?;
        }
    }
    Ok(seqs)
}
