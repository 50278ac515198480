//! Every supported family, on small synthetic checkpoints written through `StreamingWriter`:
//! the engine's logits must match an independent f64 reference forward pass. Also the shared
//! tiny Llama-2 GGUF: loading, tokenizer, and q/k un-permutation checked against llama.cpp's
//! interleaved RoPE applied to the file's raw rows.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use serde_json::{Value, json};

const WINDOW: usize = 12;
/// Max |engine - reference| allowed, relative to max(1, largest |logit|).
const TOL: f64 = 1e-4;

fn windows(vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    let a: Vec<u32> = (0..WINDOW).map(|_| rng.below(vocab)).collect();
    let b: Vec<u32> = (0..WINDOW).map(|_| rng.below(vocab)).collect();
    assert_ne!(a, b);
    vec![a, b]
}

/// Writes `config` with random weights as `dtype` in `shards` files, runs the engine on two
/// windows and compares with the reference. Returns the worst relative difference.
fn check_family(config: Value, dtype: StoreDtype, shards: usize, seed: u64) -> f64 {
    let cfg = parse_config(&config);
    let synth = synthesize(config.clone(), seed, dtype);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &synth, dtype, shards);
    if shards > 1 {
        assert!(dir.path().join("model.safetensors.index.json").exists());
        assert!(!dir.path().join("model.safetensors").exists());
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.config(), &cfg);
    assert_eq!(
        ckpt.tensors().len(),
        synth.tensors.len(),
        "library and test disagree on the tensor list"
    );
    let ws = windows(cfg.vocab_size as u32, seed ^ 0xABCD);
    let got = engine_logits(&ckpt, &ws);
    let tensors = synth.map();
    let inv = reference_inv_freq(&config);
    let mut worst = 0f64;
    for (w, g) in ws.iter().zip(&got) {
        let reference = reference_logits(&config, &tensors, &inv, RopeStyle::Half, w);
        let (diff, mag) = max_diff(g, &reference);
        assert!(mag > 0.1, "degenerate logits (max |logit| {mag})");
        let rel = diff / mag.max(1.0);
        assert!(
            rel < TOL,
            "{}: engine differs from reference by {diff} (max |logit| {mag})",
            config["model_type"]
        );
        worst = worst.max(rel);
    }
    // The logits of a suffix are the suffix of the logits.
    let engine = model::engine::LayerEngine::new(&ckpt, model::default_device(), WINDOW);
    let mut states = engine.embed(&ws[..1]).unwrap();
    engine
        .run_blocks(&mut states, |_, _, _| Ok(()), || {})
        .unwrap();
    let head = engine.load_head().unwrap();
    let tail = head.logits(&states[0], 5);
    let v = cfg.vocab_size;
    assert_eq!(tail.len(), (WINDOW - 5) * v);
    let d = tail
        .iter()
        .zip(&got[0][5 * v..])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        d < 1e-5,
        "logits(state, 5) differs from rows 5.. of logits(state, 0) by {d}"
    );
    worst
}

fn llama2() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2})
}

/// Llama 3: GQA, theta 500000, llama3 rope scaling. `original_max_position_embeddings` is
/// shrunk to 64 (8192 in the real model) so the scaled bands matter within 12 positions.
fn llama3() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "tie_word_embeddings": false, "bos_token_id": 48, "eos_token_id": [49, 47]})
}

fn mistral() -> Value {
    json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 50,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": false})
}

fn qwen2() -> Value {
    json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 50,
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": true, "sliding_window": 32768})
}

/// SmolLM2-135M's layout in miniature: GQA 3:1, tied embeddings, theta 100000.
fn smollm2() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": true})
}

/// TinyLlama's GQA 8:1 (32 heads / 4 KV heads there; 8 / 1 here).
fn tinyllama() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false})
}

#[test]
fn llama2_mha_untied() {
    check_family(llama2(), StoreDtype::F32, 1, 1);
}

#[test]
fn llama3_gqa_rope_scaling() {
    let config = llama3();
    // The independent frequencies agree with the library's, and the scaling is not a no-op
    // for this config (one band kept, one smoothed, the rest divided by the factor).
    let inv = reference_inv_freq(&config);
    let lib = parse_config(&config).rope_inv_freq();
    assert_eq!(inv.len(), lib.len());
    for (a, b) in inv.iter().zip(&lib) {
        assert!((a - b).abs() <= 1e-15 * a.abs(), "{a} vs {b}");
    }
    let mut plain = config.clone();
    plain.as_object_mut().unwrap().remove("rope_scaling");
    let unscaled = reference_inv_freq(&plain);
    assert_eq!(inv[0], unscaled[0]);
    assert!(inv.iter().zip(&unscaled).filter(|(a, b)| a != b).count() >= 2);
    check_family(config.clone(), StoreDtype::F32, 1, 2);

    // Negative control: the reference without scaling is far from the engine.
    let synth = synthesize(config.clone(), 2, StoreDtype::F32);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &synth, StoreDtype::F32, 1);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let ws = windows(50, 2 ^ 0xABCD);
    let got = engine_logits(&ckpt, &ws);
    let wrong = reference_logits(&config, &synth.map(), &unscaled, RopeStyle::Half, &ws[0]);
    let (diff, mag) = max_diff(&got[0], &wrong);
    assert!(
        diff / mag.max(1.0) > 100.0 * TOL,
        "unscaled RoPE is indistinguishable ({diff})"
    );
}

#[test]
fn mistral_gqa() {
    check_family(mistral(), StoreDtype::F32, 1, 3);
}

#[test]
fn qwen2_qkv_bias_tied() {
    let synth = synthesize(qwen2(), 4, StoreDtype::F32);
    assert!(synth.get("model.layers.1.self_attn.k_proj.bias").is_some());
    assert!(synth.get("model.layers.1.self_attn.o_proj.bias").is_none());
    assert!(synth.get("lm_head.weight").is_none());
    check_family(qwen2(), StoreDtype::F32, 1, 4);
}

#[test]
fn smollm2_gqa_3_to_1_tied() {
    check_family(smollm2(), StoreDtype::F32, 1, 5);
}

#[test]
fn tinyllama_gqa_8_to_1() {
    check_family(tinyllama(), StoreDtype::F32, 1, 6);
}

#[test]
fn llama_with_attention_and_mlp_bias() {
    let mut c = llama2();
    c["attention_bias"] = json!(true);
    c["mlp_bias"] = json!(true);
    check_family(c, StoreDtype::F32, 1, 7);
}

#[test]
fn llama_with_explicit_head_dim() {
    // head_dim (24) differs from hidden / heads (16): q is [96, 64], o_proj [64, 96].
    let mut c = llama3();
    c["head_dim"] = json!(24);
    check_family(c, StoreDtype::F32, 1, 8);
}

#[test]
fn f16_storage() {
    check_family(llama2(), StoreDtype::F16, 1, 9);
}

#[test]
fn bf16_storage() {
    check_family(smollm2(), StoreDtype::BF16, 1, 10);
    check_family(qwen2(), StoreDtype::BF16, 1, 11);
}

#[test]
fn sharded_folder() {
    check_family(mistral(), StoreDtype::F32, 2, 12);
    check_family(qwen2(), StoreDtype::BF16, 2, 13);
}

#[test]
fn reference_is_sensitive_to_weights() {
    // Guards the comparison itself: a perturbed weight must move the engine off the reference.
    let config = llama2();
    let synth = synthesize(config.clone(), 14, StoreDtype::F32);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &synth, StoreDtype::F32, 1);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let ws = windows(50, 14);
    let got = engine_logits(&ckpt, &ws);
    let mut t = synth.map();
    t.get_mut("model.layers.1.self_attn.k_proj.weight").unwrap()[3] += 0.5;
    let reference = reference_logits(
        &config,
        &t,
        &reference_inv_freq(&config),
        RopeStyle::Half,
        &ws[0],
    );
    let (diff, mag) = max_diff(&got[0], &reference);
    assert!(
        diff / mag.max(1.0) > 10.0 * TOL,
        "perturbation undetected ({diff})"
    );
}

// ---------------------------------------------------------------------------------------
// The shared tiny Llama-2 GGUF (F16, 1 block, hidden 8, 32,000-token SentencePiece vocab).

const TINY_GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/models/llama-2-tiny-random.gguf"
);

fn tiny_gguf() -> Option<Checkpoint> {
    let p = Path::new(TINY_GGUF);
    if !model::testkit::require_file(p, "the shared tiny GGUF, ../shared/models") {
        return None;
    }
    Some(Checkpoint::open(p).unwrap())
}

#[test]
fn tiny_gguf_opens_with_a_sane_config() {
    let Some(ckpt) = tiny_gguf() else { return };
    assert_eq!(ckpt.format(), "gguf");
    let c = ckpt.config();
    assert_eq!(c.model_type, "llama");
    assert_eq!(c.vocab_size, 32000);
    assert_eq!(c.hidden_size, 8);
    assert_eq!(c.num_hidden_layers, 1);
    assert!(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0);
    assert_eq!(c.num_attention_heads % c.num_kv_heads(), 0);
    assert!(c.intermediate_size > 0);
    assert!(c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1e-3);
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.bos_token_id.as_ref().and_then(|b| b.first()), Some(1));
    assert_eq!(c.eos_token_id.as_ref().and_then(|b| b.first()), Some(2));
    let g = ckpt.gguf().unwrap();
    assert_eq!(g.arch().unwrap(), "llama");
    // Every expected tensor is present with its HF shape and reads finite.
    for (name, shape) in ckpt.expected_tensors() {
        assert!(ckpt.has(&name), "{name} missing");
        let data = ckpt.read(&name, &shape).unwrap();
        assert_eq!(data.len(), shape.iter().product::<usize>());
        assert!(
            data.iter().all(|v| v.is_finite()),
            "{name} has non-finite values"
        );
        assert!(data.iter().any(|&v| v != 0.0), "{name} is all zeros");
    }
}

#[test]
fn tiny_gguf_sentencepiece_tokenizer() {
    let Some(ckpt) = tiny_gguf() else { return };
    let tok = model::load_tokenizer(&ckpt).unwrap();
    assert!(tok.add_bos, "Llama-2 GGUF adds BOS");
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<s>"));
    // Built as SentencePiece: BPE with byte fallback and the ▁ word-boundary normalizer.
    let json: Value = serde_json::from_str(tok.to_json()).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["model"]["byte_fallback"], true);
    assert!(tok.to_json().contains('\u{2581}'));
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world! 12 + 30 = 42",
        "naïve café — ✓",
    ] {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.is_empty() && ids.iter().all(|&i| i < 32000));
        assert_ne!(ids[0], 1, "encode() adds no BOS itself");
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    let ids = tok.encode("Hello world").unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["\u{2581}Hello", "\u{2581}world"]);
}

/// HF-layout tensors of a checkpoint (as the library reads them).
fn hf_tensors(ckpt: &Checkpoint) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    ckpt.expected_tensors()
        .into_iter()
        .map(|(n, s)| {
            let d = ckpt.read(&n, &s).unwrap();
            (n, s, d)
        })
        .collect()
}

fn tiny_config_json(ckpt: &Checkpoint) -> Value {
    serde_json::to_value(ckpt.config()).unwrap()
}

#[test]
fn tiny_gguf_forward_matches_llama_cpp_rope_on_raw_rows() {
    let Some(ckpt) = tiny_gguf() else { return };
    let g = ckpt.gguf().unwrap();
    // The file's own rows, q/k still permuted, named by their HF names.
    let mut raw = BTreeMap::new();
    for t in g.tensors() {
        if let Some(name) = model::gguf::gguf_to_hf_name(&t.name) {
            raw.insert(name, g.read_f32(t));
        }
    }
    let config = tiny_config_json(&ckpt);
    let windows = vec![
        vec![1u32, 450, 4996, 17354, 1701, 29916, 432, 17204],
        vec![1u32, 15043, 29892, 3186, 29991, 31999, 0, 2],
    ];
    let got = engine_logits(&ckpt, &windows);
    let inv = reference_inv_freq(&config);
    let hf: BTreeMap<_, _> = hf_tensors(&ckpt)
        .into_iter()
        .map(|(n, _, d)| (n, d))
        .collect();
    for (w, g) in windows.iter().zip(&got) {
        assert!(g.iter().all(|v| v.is_finite()));
        // llama.cpp rotates adjacent pairs of the permuted rows; the engine rotates halves of
        // the un-permuted rows. Equal logits mean the un-permutation is right.
        let reference = reference_logits(&config, &raw, &inv, RopeStyle::Interleaved, w);
        let (diff, mag) = max_diff(g, &reference);
        assert!(
            diff / mag.max(1e-3) < TOL,
            "engine vs llama.cpp-style reference: {diff} (max |logit| {mag})"
        );
        // And the rows as the library un-permutes them agree with HF-style RoPE.
        let reference = reference_logits(&config, &hf, &inv, RopeStyle::Half, w);
        let (diff2, _) = max_diff(g, &reference);
        assert!(diff2 / mag.max(1e-3) < TOL);
    }
    // The logits of this random file barely depend on attention, so check the q/k
    // un-permutation where it acts: every rotated q.k score, from the library's rows with
    // HF RoPE, equals llama.cpp's interleaved RoPE on the file's rows.
    let c = ckpt.config();
    let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
    let emb = &hf["model.embed_tokens.weight"];
    let xs: Vec<Vec<f64>> = windows[0]
        .iter()
        .map(|&t| {
            emb[t as usize * c.hidden_size..(t as usize + 1) * c.hidden_size]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    let scores =
        |t: &BTreeMap<String, Vec<f32>>, style| qk_scores(t, nh, nkv, hd, &inv, style, &xs);
    let good = scores(&hf, RopeStyle::Half);
    let file = scores(&raw, RopeStyle::Interleaved);
    let mag = good.iter().map(|v| v.abs()).fold(0.0, f64::max);
    assert!(mag > 0.0);
    let d = good
        .iter()
        .zip(&file)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        d <= 1e-9 * mag,
        "un-permuted q/k disagree with llama.cpp's convention: {d} of {mag}"
    );
    // Negative control: the file's rows with HF RoPE (no un-permutation) give other scores.
    let wrong = scores(&raw, RopeStyle::Half);
    let d = good
        .iter()
        .zip(&wrong)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        d > 1e-3 * mag,
        "permutation has no effect on this file ({d} of {mag})"
    );
}

/// Rotated attention scores q_i . k_j (all heads, all i, j) of block 0 for inputs `xs`.
fn qk_scores(
    t: &BTreeMap<String, Vec<f32>>,
    nh: usize,
    nkv: usize,
    hd: usize,
    inv: &[f64],
    style: RopeStyle,
    xs: &[Vec<f64>],
) -> Vec<f64> {
    let proj = |name: &str, heads: usize, x: &[f64], pos: usize| {
        let mut v = matvec(
            &t[&format!("model.layers.0.self_attn.{name}.weight")],
            None,
            x,
            heads * hd,
        );
        for h in v.chunks_exact_mut(hd) {
            rope(h, pos, inv, style);
        }
        v
    };
    let qs: Vec<_> = xs
        .iter()
        .enumerate()
        .map(|(p, x)| proj("q_proj", nh, x, p))
        .collect();
    let ks: Vec<_> = xs
        .iter()
        .enumerate()
        .map(|(p, x)| proj("k_proj", nkv, x, p))
        .collect();
    let mut out = Vec::new();
    for q in &qs {
        for k in &ks {
            for h in 0..nh {
                let kh = h / (nh / nkv);
                out.push((0..hd).map(|d| q[h * hd + d] * k[kh * hd + d]).sum());
            }
        }
    }
    out
}

#[test]
fn tiny_gguf_and_its_hf_conversion_give_identical_logits() {
    let Some(ckpt) = tiny_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let synth = Synthetic {
        config: tiny_config_json(&ckpt),
        tensors: hf_tensors(&ckpt),
    };
    write_hf(dir.path(), &synth, StoreDtype::F32, 1);
    let hf = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(hf.config(), ckpt.config());
    let windows = vec![
        vec![1u32, 450, 4996, 17354, 1701],
        vec![1u32, 31999, 29871, 13, 3],
    ];
    let a = engine_logits(&ckpt, &windows);
    let b = engine_logits(&hf, &windows);
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().all(|v| v.is_finite()));
        assert_eq!(x, y, "GGUF and converted HF folder disagree");
    }
}
