//! Writes a synthetic random Hugging Face Llama checkpoint of a published model's shape, for
//! load and speed benchmarks (`scripts/bench/scale.sh`). The weights are random, so the
//! model's outputs mean nothing.
//!
//! ```sh
//! cargo run --release -p model --example synth -- --shape 0.5b|1.5b|3b|7b [--dtype bf16] [--seed N] [--layers N] OUT_DIR
//! ```
//!
//! `--layers N` keeps the shape's widths with fewer blocks: per-block memory is the shape's,
//! time and disk scale with N (for benchmarks whose peak memory is one block's).
//!
//! OUT_DIR gets `config.json`, `model.safetensors` (written one tensor at a time through
//! `StreamingWriter`; only one tensor is ever in memory) and a byte-level `tokenizer.json`
//! (the 256 byte tokens, no merges, plus `<s>` and `</s>`), which tokenizes any text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use model::safetensors_io::{StoreDtype, StreamingWriter};
use model::{Config, Tokenizer};
use rayon::prelude::*;
use serde_json::json;

/// A shape: the published dimensions of a model, always written as a Llama architecture.
struct Shape {
    name: &'static str,
    like: &'static str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    tied: bool,
    rope_theta: f64,
    rms_eps: f64,
    max_pos: usize,
}

/// Qwen2.5-0.5B / 1.5B / 3B (their `config.json`: GQA with 2 KV heads, vocab 151,936, tied
/// embeddings, theta 1e6; written without Qwen2's q/k/v biases since the architecture here is
/// Llama) and Llama-2-7B (MHA, vocab 32,000, untied).
const SHAPES: &[Shape] = &[
    Shape {
        name: "0.5b",
        like: "Qwen2.5-0.5B",
        hidden: 896,
        intermediate: 4864,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        vocab: 151_936,
        tied: true,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_pos: 32_768,
    },
    Shape {
        name: "1.5b",
        like: "Qwen2.5-1.5B",
        hidden: 1536,
        intermediate: 8960,
        layers: 28,
        heads: 12,
        kv_heads: 2,
        vocab: 151_936,
        tied: true,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_pos: 32_768,
    },
    Shape {
        name: "3b",
        like: "Qwen2.5-3B",
        hidden: 2048,
        intermediate: 11_008,
        layers: 36,
        heads: 16,
        kv_heads: 2,
        vocab: 151_936,
        tied: true,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_pos: 32_768,
    },
    Shape {
        name: "7b",
        like: "Llama-2-7B",
        hidden: 4096,
        intermediate: 11_008,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        vocab: 32_000,
        tied: false,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        max_pos: 4096,
    },
];

const BOS: u32 = 256;
const EOS: u32 = 257;

fn usage() -> ! {
    let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
    eprintln!(
        "usage: synth --shape {} [--dtype f32|f16|bf16] [--seed N] [--layers N] OUT_DIR",
        names.join("|")
    );
    std::process::exit(2)
}

fn fail(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

struct Args {
    shape: Shape,
    dtype: StoreDtype,
    seed: u64,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut shape = None;
    let mut dtype = StoreDtype::BF16;
    let mut seed = 0x5EED_u64;
    let mut layers = None;
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .unwrap_or_else(|| fail(format!("{flag} needs a value")))
        };
        match a.as_str() {
            "--shape" => {
                let v = value("--shape");
                shape = Some(
                    SHAPES
                        .iter()
                        .find(|s| s.name.eq_ignore_ascii_case(&v))
                        .unwrap_or_else(|| fail(format!("unknown shape `{v}`"))),
                );
            }
            "--dtype" => {
                let v = value("--dtype");
                dtype = StoreDtype::parse(&v)
                    .unwrap_or_else(|| fail(format!("--dtype `{v}` is not f32, f16 or bf16")));
            }
            "--seed" => {
                let v = value("--seed");
                seed = v
                    .parse()
                    .unwrap_or_else(|_| fail(format!("--seed `{v}` is not an integer")));
            }
            "--layers" => {
                let v = value("--layers");
                layers = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &usize| n > 0)
                        .unwrap_or_else(|| {
                            fail(format!("--layers `{v}` is not a positive integer"))
                        }),
                );
            }
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => fail(format!("unknown option `{s}`")),
            s => {
                if out.replace(PathBuf::from(s)).is_some() {
                    usage()
                }
            }
        }
    }
    match (shape, out) {
        (Some(shape), Some(out)) => {
            let mut shape = Shape { ..*shape };
            shape.layers = layers.unwrap_or(shape.layers);
            Args {
                shape,
                dtype,
                seed,
                out,
            }
        }
        _ => usage(),
    }
}

/// GPT-2's byte-to-character map (printable bytes stand for themselves, the rest are
/// shifted past U+0100), so every byte is one token of the byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                n += 1;
                char::from_u32(255 + n).expect("valid")
            }
        })
        .collect()
}

/// A byte-level BPE with the 256 byte tokens (id = byte value), no merges, and `<s>`/`</s>`.
fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    vocab.insert("<s>".into(), json!(BOS));
    vocab.insert("</s>".into(), json!(EOS));
    let special = |id: u32, s: &str| {
        json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true})
    };
    let v = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(BOS, "<s>"), special(EOS, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    serde_json::to_string(&v).expect("serializable")
}

/// SplitMix64: seeds the per-chunk generators from (seed, tensor, chunk).
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `out` with normal-ish values (Irwin-Hall: the sum of four 16-bit uniforms from one
/// xorshift64 draw) of standard deviation `std`, in parallel chunks with their own streams.
/// Each chunk runs `LANES` independent generators side by side so the loop vectorizes.
fn fill_random(out: &mut [f32], std: f32, seed: u64) {
    const CHUNK: usize = 1 << 16;
    const LANES: usize = 16;
    // The sum of 4 uniforms on [0, 1) has mean 2 and variance 4/12.
    let scale = std / (4.0f32 / 12.0).sqrt() / 65536.0;
    let value = |s: u64| {
        let sum = (s & 0xFFFF) + ((s >> 16) & 0xFFFF) + ((s >> 32) & 0xFFFF) + (s >> 48);
        (sum as i32 - 2 * 65536) as f32 * scale
    };
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut state = [0u64; LANES];
            for (l, s) in state.iter_mut().enumerate() {
                *s = splitmix(seed ^ splitmix((c * LANES + l) as u64)) | 1;
            }
            let mut groups = chunk.chunks_exact_mut(LANES);
            for group in &mut groups {
                for (s, v) in state.iter_mut().zip(group.iter_mut()) {
                    *s ^= *s << 13;
                    *s ^= *s >> 7;
                    *s ^= *s << 17;
                    *v = value(*s);
                }
            }
            for (s, v) in state.iter_mut().zip(groups.into_remainder()) {
                *s ^= *s << 13;
                *s ^= *s >> 7;
                *s ^= *s << 17;
                *v = value(*s);
            }
        });
}

fn config_of(s: &Shape, dtype: StoreDtype) -> Config {
    Config {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        vocab_size: s.vocab,
        hidden_size: s.hidden,
        intermediate_size: s.intermediate,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        num_key_value_heads: Some(s.kv_heads),
        head_dim: None,
        hidden_act: "silu".into(),
        max_position_embeddings: s.max_pos,
        rms_norm_eps: s.rms_eps,
        rope_theta: s.rope_theta,
        rope_scaling: None,
        tie_word_embeddings: s.tied,
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: Some(model::config::TokenIds::One(BOS)),
        eos_token_id: Some(model::config::TokenIds::One(EOS)),
        torch_dtype: Some(dtype.torch_name().into()),
    }
}

fn write(a: &Args) -> model::Result<()> {
    let s = &a.shape;
    let cfg = config_of(s, a.dtype);
    cfg.validate(Path::new("config.json"))?;
    let out = &a.out;
    std::fs::create_dir_all(out).map_err(|e| model::ModelError::io(out, e))?;

    // The tokenizer must parse, round-trip text and fit the vocabulary before anything else.
    let tok_json = tokenizer_json();
    let tok = Tokenizer::from_json(tok_json.clone(), &out.join("tokenizer.json"))?;
    let sample =
        "Synthetic checkpoints tokenize any text: ünïcödé, digits 0123, tabs\tand\nnewlines.";
    let ids = tok.encode(sample)?;
    assert_eq!(ids.len(), sample.len(), "one token per byte");
    assert_eq!(tok.decode(&ids)?, sample, "tokenizer round trip");
    assert!(
        tok.vocab_size() <= cfg.vocab_size,
        "tokenizer vocab exceeds the model's"
    );

    let write_file = |name: &str, text: &str| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| model::ModelError::io(&p, e))
    };
    write_file(
        "config.json",
        &serde_json::to_string_pretty(&cfg).expect("serializable"),
    )?;
    write_file("tokenizer.json", &tok_json)?;
    let tc = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": false, "model_max_length": cfg.max_position_embeddings});
    write_file(
        "tokenizer_config.json",
        &serde_json::to_string_pretty(&tc).expect("serializable"),
    )?;

    let plan: Vec<(String, Vec<usize>, StoreDtype)> = model::checkpoint::expected_tensors(&cfg)
        .into_iter()
        .map(|(n, sh)| (n, sh, a.dtype))
        .collect();
    let params: usize = plan
        .iter()
        .map(|(_, sh, _)| sh.iter().product::<usize>())
        .sum();
    eprintln!(
        "synth: {} ({}-shaped Llama), {} tensors, {:.3} B parameters, {} -> {}",
        s.name,
        s.like,
        plan.len(),
        params as f64 / 1e9,
        a.dtype.torch_name(),
        out.display()
    );
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st = out.join("model.safetensors");
    let start = Instant::now();
    let mut w = StreamingWriter::create(&st, plan.clone(), &meta)?;
    // One reusable buffer, sized for the largest tensor: no per-tensor or per-element
    // allocation beyond the writer's encoded bytes.
    let largest = plan
        .iter()
        .map(|(_, sh, _)| sh.iter().product::<usize>())
        .max()
        .unwrap_or(0);
    let mut buf = vec![0f32; largest];
    let (mut gen_s, mut write_s) = (0f64, 0f64);
    for (i, (name, shape, _)) in plan.iter().enumerate() {
        let n: usize = shape.iter().product();
        let data = &mut buf[..n];
        let t = Instant::now();
        if name.ends_with("norm.weight") {
            data.fill(1.0);
        } else {
            fill_random(data, 0.02, splitmix(a.seed ^ splitmix(i as u64 + 1)));
        }
        gen_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        w.write_next(name, data)?;
        write_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    w.finish()?;
    write_s += t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&st).map(|m| m.len()).unwrap_or(0);
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "synth: wrote {bytes} bytes in {secs:.1} s ({:.0} MB/s; generating {gen_s:.1} s, encoding and writing {write_s:.1} s)",
        bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}

fn main() {
    let a = parse_args();
    if let Err(e) = write(&a) {
        fail(e.to_string());
    }
}
