//! Test support shared by `model/tests/families.rs` and `eval/tests/synthetic.rs` (which
//! includes this file by path): a seeded PRNG, small synthetic HF checkpoints written through
//! `StreamingWriter`, and an independent f64 reference forward pass of the Llama block.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use model::engine::LayerEngine;
use model::safetensors_io::{StoreDtype, StreamingWriter};
use model::{Checkpoint, Config};
use serde_json::{Value, json};

/// xorshift64* — small, seeded, good enough for test weights.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

/// f16 bits to f32, written out by hand (independent of `half`).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f64 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let mant = (h & 0x3ff) as f64;
    let v = match exp {
        0 => mant * 2f64.powi(-24),
        31 => {
            if mant == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (1.0 + mant / 1024.0) * 2f64.powi(e - 15),
    };
    (sign * v) as f32
}

/// The values a tensor holds once stored as `dtype` (encoded by the library's writer,
/// decoded here by hand), so the reference sees exactly what the file holds.
pub fn as_stored(data: &[f32], dtype: StoreDtype) -> Vec<f32> {
    let bytes = dtype.encode(data);
    match dtype {
        StoreDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        StoreDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        StoreDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
    }
}

/// A synthetic model: its config JSON and every tensor (HF name -> shape, values as stored).
pub struct Synthetic {
    pub config: Value,
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Synthetic {
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors
            .iter()
            .find(|t| t.0 == name)
            .map(|t| t.2.as_slice())
    }
    pub fn map(&self) -> BTreeMap<String, Vec<f32>> {
        self.tensors
            .iter()
            .map(|(n, _, v)| (n.clone(), v.clone()))
            .collect()
    }
}

fn cfg_usize(c: &Value, k: &str) -> Option<usize> {
    c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize)
}

/// Random weights for `config` (a JSON config.json). The tensor list is derived here from
/// the HF architecture (not from the library): q/k/v biases for `qwen2` or `attention_bias`,
/// o_proj bias for `attention_bias` on llama/mistral, MLP biases for `mlp_bias`, and no
/// `lm_head` when tied.
pub fn synthesize(config: Value, seed: u64, dtype: StoreDtype) -> Synthetic {
    let h = cfg_usize(&config, "hidden_size").unwrap();
    let inter = cfg_usize(&config, "intermediate_size").unwrap();
    let v = cfg_usize(&config, "vocab_size").unwrap();
    let layers = cfg_usize(&config, "num_hidden_layers").unwrap();
    let nh = cfg_usize(&config, "num_attention_heads").unwrap();
    let nkv = cfg_usize(&config, "num_key_value_heads").unwrap_or(nh);
    let hd = cfg_usize(&config, "head_dim").unwrap_or(h / nh);
    let qwen2 = config["model_type"] == "qwen2";
    let attn_bias = config
        .get("attention_bias")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let mlp_bias = config
        .get("mlp_bias")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let tied = config
        .get("tie_word_embeddings")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);

    let mut names: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        names.push((format!("{p}.input_layernorm.weight"), vec![h]));
        names.push((format!("{p}.self_attn.q_proj.weight"), vec![nh * hd, h]));
        names.push((format!("{p}.self_attn.k_proj.weight"), vec![nkv * hd, h]));
        names.push((format!("{p}.self_attn.v_proj.weight"), vec![nkv * hd, h]));
        names.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nh * hd]));
        if qwen2 || attn_bias {
            names.push((format!("{p}.self_attn.q_proj.bias"), vec![nh * hd]));
            names.push((format!("{p}.self_attn.k_proj.bias"), vec![nkv * hd]));
            names.push((format!("{p}.self_attn.v_proj.bias"), vec![nkv * hd]));
        }
        if !qwen2 && attn_bias {
            names.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        names.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        names.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, h]));
        names.push((format!("{p}.mlp.up_proj.weight"), vec![inter, h]));
        names.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter]));
        if mlp_bias {
            names.push((format!("{p}.mlp.gate_proj.bias"), vec![inter]));
            names.push((format!("{p}.mlp.up_proj.bias"), vec![inter]));
            names.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
        }
    }
    names.push(("model.norm.weight".into(), vec![h]));
    if !tied {
        names.push(("lm_head.weight".into(), vec![v, h]));
    }

    let mut rng = Rng::new(seed);
    let tensors = names
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    let u = rng.uniform();
                    // Norm gains around 1, everything else small (scale 0.1; the embedding
                    // larger so the residual stream is not dominated by the first block).
                    (if norm {
                        1.0 + 0.2 * u
                    } else if name.contains("embed_tokens") {
                        0.5 * u
                    } else {
                        0.1 * u
                    }) as f32
                })
                .collect();
            let data = as_stored(&data, dtype);
            (name, shape, data)
        })
        .collect();
    Synthetic { config, tensors }
}

/// Writes `config.json` and the weights (one file, or `shards` files plus
/// `model.safetensors.index.json`) into `dir`.
pub fn write_hf(dir: &Path, s: &Synthetic, dtype: StoreDtype, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&s.config).unwrap(),
    )
    .unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let per = s.tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, part) in s.tensors.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        let plan = part
            .iter()
            .map(|(n, sh, _)| (n.clone(), sh.clone(), dtype))
            .collect();
        let mut w = StreamingWriter::create(&dir.join(&file), plan, &meta).unwrap();
        for (n, _, data) in part {
            w.write_next(n, data).unwrap();
            weight_map.insert(n.clone(), json!(file));
        }
        w.finish().unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    }
}

/// RoPE inverse frequencies computed from the config JSON, independently of
/// `Config::rope_inv_freq` (HF `_compute_default_rope_parameters` and
/// `_compute_llama3_parameters`, written in the latter's `torch.where` form).
pub fn reference_inv_freq(config: &Value) -> Vec<f64> {
    let h = cfg_usize(config, "hidden_size").unwrap();
    let nh = cfg_usize(config, "num_attention_heads").unwrap();
    let hd = cfg_usize(config, "head_dim").unwrap_or(h / nh);
    let base = config
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .unwrap_or(10_000.0);
    // inv_freq = 1 / base^(arange(0, dim, 2) / dim)
    let inv: Vec<f64> = (0..hd)
        .step_by(2)
        .map(|k| 1.0 / base.powf(k as f64 / hd as f64))
        .collect();
    let Some(rs) = config.get("rope_scaling").filter(|v| !v.is_null()) else {
        return inv;
    };
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|v| v.as_str())
        .unwrap();
    assert_eq!(kind, "llama3", "reference only knows llama3 scaling");
    let factor = rs["factor"].as_f64().unwrap();
    let low_freq_factor = rs["low_freq_factor"].as_f64().unwrap();
    let high_freq_factor = rs["high_freq_factor"].as_f64().unwrap();
    let old_context_len = rs["original_max_position_embeddings"].as_f64().unwrap();
    let low_freq_wavelen = old_context_len / low_freq_factor;
    let high_freq_wavelen = old_context_len / high_freq_factor;
    inv.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let llama = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            let smooth_factor = (old_context_len / wavelen - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (1.0 - smooth_factor) * llama / factor + smooth_factor * llama;
            // HF: ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium { smoothed } else { llama }
        })
        .collect()
}

/// How q/k rows pair up for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// HF `rotate_half`: element i pairs with i + head_dim/2.
    Half,
    /// llama.cpp's `LLAMA_ROPE_TYPE_NORM` on GGUF's permuted rows: 2i pairs with 2i+1.
    Interleaved,
}

pub fn matvec(w: &[f32], b: Option<&[f32]>, x: &[f64], out_dim: usize) -> Vec<f64> {
    let in_dim = x.len();
    assert_eq!(w.len(), out_dim * in_dim);
    (0..out_dim)
        .map(|o| {
            let row = &w[o * in_dim..(o + 1) * in_dim];
            let s: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum();
            s + b.map_or(0.0, |b| b[o] as f64)
        })
        .collect()
}

fn rms_norm(x: &[f64], g: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, &g)| v * r * g as f64).collect()
}

pub fn rope(x: &mut [f64], pos: usize, inv: &[f64], style: RopeStyle) {
    let half = x.len() / 2;
    for (i, &f) in inv.iter().enumerate() {
        let (c, s) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
        let (a, b) = match style {
            RopeStyle::Half => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x1 * c + x0 * s;
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// The plain f64 forward pass: logits `[tokens.len()][vocab]`. `t` maps HF names to values
/// (in HF layout for `RopeStyle::Half`, in GGUF's permuted q/k layout for `Interleaved`).
pub fn reference_logits(
    config: &Value,
    t: &BTreeMap<String, Vec<f32>>,
    inv_freq: &[f64],
    style: RopeStyle,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let h = cfg_usize(config, "hidden_size").unwrap();
    let inter = cfg_usize(config, "intermediate_size").unwrap();
    let v = cfg_usize(config, "vocab_size").unwrap();
    let layers = cfg_usize(config, "num_hidden_layers").unwrap();
    let nh = cfg_usize(config, "num_attention_heads").unwrap();
    let nkv = cfg_usize(config, "num_key_value_heads").unwrap_or(nh);
    let hd = cfg_usize(config, "head_dim").unwrap_or(h / nh);
    let eps = config
        .get("rms_norm_eps")
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-6);
    let get = |n: &str| {
        t.get(n)
            .unwrap_or_else(|| panic!("reference: missing {n}"))
            .as_slice()
    };
    let opt = |n: &str| t.get(n).map(|v| v.as_slice());
    let emb = get("model.embed_tokens.weight");
    let n = tokens.len();

    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tok| {
            emb[tok as usize * h..(tok as usize + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let w = |s: &str| get(&format!("{p}.{s}.weight"));
        let b = |s: &str| opt(&format!("{p}.{s}.bias"));
        let mut qs = Vec::with_capacity(n);
        let mut ks = Vec::with_capacity(n);
        let mut vs = Vec::with_capacity(n);
        for (pos, xi) in x.iter().enumerate() {
            let nx = rms_norm(xi, w("input_layernorm"), eps);
            let mut q = matvec(w("self_attn.q_proj"), b("self_attn.q_proj"), &nx, nh * hd);
            let mut k = matvec(w("self_attn.k_proj"), b("self_attn.k_proj"), &nx, nkv * hd);
            let vv = matvec(w("self_attn.v_proj"), b("self_attn.v_proj"), &nx, nkv * hd);
            for head in q.chunks_exact_mut(hd) {
                rope(head, pos, inv_freq, style);
            }
            for head in k.chunks_exact_mut(hd) {
                rope(head, pos, inv_freq, style);
            }
            qs.push(q);
            ks.push(k);
            vs.push(vv);
        }
        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        for i in 0..n {
            let mut ctx = vec![0f64; nh * hd];
            for head in 0..nh {
                let kvh = head / group;
                let q = &qs[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        ctx[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(w("self_attn.o_proj"), b("self_attn.o_proj"), &ctx, h);
            for (a, b) in x[i].iter_mut().zip(o) {
                *a += b;
            }
            let nx = rms_norm(&x[i], w("post_attention_layernorm"), eps);
            let g = matvec(w("mlp.gate_proj"), b("mlp.gate_proj"), &nx, inter);
            let u = matvec(w("mlp.up_proj"), b("mlp.up_proj"), &nx, inter);
            let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
            let d = matvec(w("mlp.down_proj"), b("mlp.down_proj"), &a, h);
            for (a, b) in x[i].iter_mut().zip(d) {
                *a += b;
            }
        }
    }
    let head = opt("lm_head.weight").unwrap_or(emb);
    x.iter()
        .map(|xi| matvec(head, None, &rms_norm(xi, get("model.norm.weight"), eps), v))
        .collect()
}

/// The engine's logits for each window (embed -> run_blocks -> load_head -> logits).
pub fn engine_logits(ckpt: &Checkpoint, windows: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let max = windows.iter().map(|w| w.len()).max().unwrap();
    let engine = LayerEngine::new(ckpt, model::default_device(), max);
    let mut states = engine.embed(windows).unwrap();
    engine
        .run_blocks(&mut states, |_, _, _| Ok(()), || {})
        .unwrap();
    let head = engine.load_head().unwrap();
    states.iter().map(|s| head.logits(s, 0)).collect()
}

/// Largest |engine - reference| over all logits, and the largest |reference|.
pub fn max_diff(engine: &[f32], reference: &[Vec<f64>]) -> (f64, f64) {
    let flat: Vec<f64> = reference.iter().flatten().copied().collect();
    assert_eq!(engine.len(), flat.len(), "logit count");
    let diff = engine
        .iter()
        .zip(&flat)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    let mag = flat.iter().map(|v| v.abs()).fold(0.0, f64::max);
    (diff, mag)
}

/// Parses a config JSON the way the library does (checks the test configs are valid).
pub fn parse_config(config: &Value) -> Config {
    Config::from_json_str(&config.to_string(), Path::new("config.json")).unwrap()
}
