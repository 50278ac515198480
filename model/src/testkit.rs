//! Tiny synthetic checkpoints for tests of the crates built on this one (quantization,
//! pruning, the CLI): an HF folder with random weights and a byte-level BPE tokenizer that
//! tokenizes any text, written in milliseconds, with no network.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::safetensors_io::{StoreDtype, StreamingWriter};

/// xorshift64: deterministic weights for a seed.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A tiny llama config: hidden 64, 4 heads of 16, 2 KV heads, FFN 256, 3 layers, untied,
/// vocabulary 300. Edit the returned JSON for other shapes.
pub fn tiny_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300,
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
    })
}

/// Writes an HF folder for `config` (f32 weights: norms near 1, matrices uniform in
/// ±0.05·scale), letting `edit` change any tensor before it is written; returns every tensor.
pub fn write_hf(
    dir: &Path,
    config: &Value,
    seed: u64,
    mut edit: impl FnMut(&str, &mut Vec<f32>),
) -> BTreeMap<String, Vec<f32>> {
    std::fs::create_dir_all(dir).expect("create dir");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    let cfg = crate::Config::from_json_str(&config.to_string(), Path::new("config.json"))
        .expect("valid config");
    let mut rng = Rng(seed | 1);
    let plan: Vec<(String, Vec<usize>, StoreDtype)> = crate::checkpoint::expected_tensors(&cfg)
        .into_iter()
        .map(|(n, s)| (n, s, StoreDtype::F32))
        .collect();
    let mut w = StreamingWriter::create(
        &dir.join("model.safetensors"),
        plan.clone(),
        &BTreeMap::new(),
    )
    .expect("create safetensors");
    let mut tensors = BTreeMap::new();
    for (name, shape, _) in &plan {
        let n: usize = shape.iter().product();
        let mut data: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| 1.0 + 0.1 * rng.next()).collect()
        } else {
            (0..n).map(|_| 0.05 * rng.next()).collect()
        };
        edit(name, &mut data);
        w.write_next(name, &data).expect("write tensor");
        tensors.insert(name.clone(), data);
    }
    w.finish().expect("finish safetensors");
    write_byte_tokenizer(dir, cfg.vocab_size);
    tensors
}

/// GPT-2's byte-to-unicode map.
fn byte_chars() -> Vec<char> {
    let mut keep: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars: Vec<u32> = keep.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            keep.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in keep.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).expect("valid char");
    }
    out
}

/// `tokenizer.json` and `tokenizer_config.json`: byte-level BPE with `<s>` = 0, `</s>` = 1,
/// the 256 bytes at 2..258 and two merges (258, 259); needs a vocabulary of at least 260.
pub fn write_byte_tokenizer(dir: &Path, vocab_size: usize) {
    assert!(vocab_size >= 260, "the byte tokenizer needs 260 ids");
    let bc = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in bc.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 2));
    }
    vocab.insert("<s>".into(), json!(0));
    vocab.insert("</s>".into(), json!(1));
    vocab.insert("Ġt".into(), json!(258));
    vocab.insert("he".into(), json!(259));
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": ["Ġ t", "h e"]}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write tokenizer");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"add_bos_token": false, "chat_template": "{{ messages }}", "pad_token": {"content": "</s>"}, "unk_token": "<s>"})
            .to_string(),
    )
    .expect("write tokenizer config");
}

/// Some English-like calibration text of about `words` words (deterministic).
pub fn calib_text(words: usize) -> String {
    const W: [&str; 16] = [
        "the", "patient", "was", "given", "a", "dose", "of", "medicine", "and", "then", "slept",
        "for", "hours", "while", "nurses", "watched",
    ];
    let mut r = Rng(12345);
    (0..words)
        .map(|_| W[((r.next() + 1.0) * 8.0) as usize % 16])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The engine's logits at every position of each window (embed, every block, head).
pub fn logits(ckpt: &crate::Checkpoint, windows: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let max = windows.iter().map(|w| w.len()).max().unwrap_or(1);
    let engine = crate::engine::LayerEngine::new(ckpt, crate::default_device(), max);
    let mut states = engine.embed(windows).expect("token ids in range");
    engine
        .run_blocks(&mut states, |_, _, _| Ok(()), || {})
        .expect("blocks run");
    let head = engine.load_head().expect("head loads");
    states.iter().map(|s| head.logits(s, 0)).collect()
}

/// Mean KL(p ‖ q) per position between two sets of logits (`vocab` wide).
pub fn mean_kld(p: &[Vec<f32>], q: &[Vec<f32>], vocab: usize) -> f64 {
    let logsoftmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|&v| v as f64 - z).collect()
    };
    let (mut sum, mut n) = (0.0, 0usize);
    for (a, b) in p.iter().zip(q) {
        for (ra, rb) in a.chunks(vocab).zip(b.chunks(vocab)) {
            let (la, lb) = (logsoftmax(ra), logsoftmax(rb));
            sum += la
                .iter()
                .zip(&lb)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>();
            n += 1;
        }
    }
    sum / n.max(1) as f64
}

/// For tests that need a file this repository does not ship (the SmolLM2 model, the shared
/// tiny GGUF): `true` when it exists. When it is missing the test must return early, except
/// under CI (`CI` set to `true` or `1`), where a missing input is a failure, not a skip. Each
/// skip is printed and, when `COMPRESS_SKIP_LOG` names a file (scripts/test.sh sets it),
/// appended there so the test summary counts it.
pub fn require_file(path: &Path, hint: &str) -> bool {
    if path.exists() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{} is missing under CI ({hint}); tests that need it cannot be skipped here",
        path.display()
    );
    let line = format!("SKIP: {} is missing ({hint})", path.display());
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("COMPRESS_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    false
}
