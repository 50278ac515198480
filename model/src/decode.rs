//! Incremental decoding with a KV cache: the whole model in memory, f32, for generation
//! (`compress generate`, teacher-generated calibration, black-box distillation) and the speed
//! figures of `compress eval --speed`. Evaluation and calibration use the layer-by-layer burn
//! path instead.
//!
//! Written by hand rather than with burn's tensors: one decoded token is a few hundred small
//! operations, and at that size each tensor operation's dispatch and allocation cost more than
//! its arithmetic. Here a step is plain loops over preallocated buffers, every linear one
//! matrix product (`kernels.rs`: dot products for decoding, gemm for prompts, in fixed
//! slices of output rows spread over rayon's threads), and the cache grows in place. Each
//! output is computed by one thread in a fixed order, so the logits do not depend on the
//! thread count.

use std::path::PathBuf;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::kernels::{dot, matmul_t};

/// A linear layer in HF layout: `w` is `[out, inp]` row-major.
struct Lin {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    out: usize,
    inp: usize,
}

impl Lin {
    fn read(ckpt: &Checkpoint, name: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            w: ckpt.read(&format!("{name}.weight"), &[out, inp])?,
            b: if bias {
                Some(ckpt.read(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
            out,
            inp,
        })
    }

    /// `x [m, inp]` row-major times the transposed weight: `[m, out]`.
    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_t(x, m, &self.w, self.out, self.inp, self.b.as_deref())
    }

    /// Linears sharing one input stacked into one (their output rows one after another):
    /// one parallel matrix product instead of several per token.
    fn stack(parts: Vec<Lin>) -> Self {
        let inp = parts[0].inp;
        debug_assert!(parts.iter().all(|p| p.inp == inp));
        let bias = parts[0].b.is_some();
        let mut w = Vec::with_capacity(parts.iter().map(|p| p.w.len()).sum());
        let mut b = bias.then(Vec::new);
        let mut out = 0;
        for p in parts {
            w.extend_from_slice(&p.w);
            if let (Some(b), Some(pb)) = (b.as_mut(), p.b.as_ref()) {
                b.extend_from_slice(pb);
            }
            out += p.out;
        }
        Self { w, b, out, inp }
    }
}

/// The columns of `y [m, Σ widths]` split into one `[m, width]` matrix per width.
fn split_cols(y: &[f32], m: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let n: usize = widths.iter().sum();
    let mut start = 0;
    widths
        .iter()
        .map(|&w| {
            let mut part = Vec::with_capacity(m * w);
            for r in 0..m {
                part.extend_from_slice(&y[r * n + start..r * n + start + w]);
            }
            start += w;
            part
        })
        .collect()
}

/// RMS norm of every row of `x` (width `gamma.len()`), in place.
fn rms_norm(x: &mut [f32], gamma: &[f32], eps: f32) {
    let h = gamma.len();
    for row in x.chunks_mut(h) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(gamma) {
            *v = *v * inv * g;
        }
    }
}

/// One decoder block's weights; q/k/v and gate/up stacked ([`Lin::stack`]).
struct Block {
    ln1: Vec<f32>,
    qkv: Lin,
    o: Lin,
    ln2: Vec<f32>,
    gate_up: Lin,
    down: Lin,
}

/// The shapes a step needs.
#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    eps: f32,
}

/// The whole model in memory with a KV cache: prefill, single-sequence and batched decoding.
pub struct Generator {
    /// The checkpoint, for error messages.
    path: PathBuf,
    d: Dims,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    embed: Vec<f32>,
    /// The output projection `[vocab, hidden]`; `None` when tied to `embed`.
    lm_head: Option<Vec<f32>>,
    inv_freq: Vec<f64>,
    /// Per block, keys and values, position-major: `[position][sequence][kv_heads * head_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Cached positions and the sequences they hold.
    len: usize,
    batch: usize,
    /// Positions the cache is sized for up front.
    max_len: usize,
}

impl Generator {
    /// Loads every block of `ckpt` (weights in f32), for sequences of about `max_len` tokens
    /// (the cache grows past it when needed).
    pub fn open(ckpt: &Checkpoint, max_len: usize) -> Result<Self> {
        let c = ckpt.config();
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (q, kv) = (c.num_attention_heads * hd, c.num_kv_heads() * hd);
        let blocks = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let lin =
                    |n: &str, out, inp, bias| Lin::read(ckpt, &format!("{p}.{n}"), out, inp, bias);
                Ok(Block {
                    ln1: ckpt.read(&format!("{p}.input_layernorm.weight"), &[h])?,
                    qkv: Lin::stack(vec![
                        lin("self_attn.q_proj", q, h, c.qkv_bias())?,
                        lin("self_attn.k_proj", kv, h, c.qkv_bias())?,
                        lin("self_attn.v_proj", kv, h, c.qkv_bias())?,
                    ]),
                    o: lin("self_attn.o_proj", h, q, c.o_bias())?,
                    ln2: ckpt.read(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    gate_up: Lin::stack(vec![
                        lin("mlp.gate_proj", i, h, c.mlp_bias)?,
                        lin("mlp.up_proj", i, h, c.mlp_bias)?,
                    ]),
                    down: lin("mlp.down_proj", h, i, c.mlp_bias)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = ckpt.read("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !ckpt.has("lm_head.weight") {
            None
        } else {
            Some(ckpt.read("lm_head.weight", &[c.vocab_size, h])?)
        };
        let n = blocks.len();
        Ok(Self {
            path: ckpt.path().to_path_buf(),
            d: Dims {
                hidden: h,
                heads: c.num_attention_heads,
                kv_heads: c.num_kv_heads(),
                head_dim: hd,
                vocab: c.vocab_size,
                eps: c.rms_norm_eps as f32,
            },
            blocks,
            norm: ckpt.read("model.norm.weight", &[h])?,
            embed,
            lm_head,
            inv_freq: c.rope_inv_freq(),
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
            len: 0,
            batch: 0,
            max_len,
        })
    }

    /// Forgets the cache (its memory is kept for the next sequence).
    pub fn reset(&mut self) {
        for c in self.keys.iter_mut().chain(self.values.iter_mut()) {
            c.clear();
        }
        self.len = 0;
        self.batch = 0;
    }

    /// Tokens in the cache (per sequence).
    pub fn cached(&self) -> usize {
        self.len
    }

    /// Runs `tokens` after the cached ones (one sequence) and returns the logits of the last
    /// position. An empty slice, a token id outside the vocabulary, or a cache holding a batch
    /// is an error, checked before anything runs, so the cache is unchanged.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check(tokens, 1)?;
        let h = self.d.hidden;
        // The whole pass runs on one of rayon's threads: each parallel loop inside it then
        // starts without waking a thread from outside the pool (hundreds per token).
        Ok(rayon::scope(|_| {
            let x = self.step(tokens, 1);
            self.logits(&x[(tokens.len() - 1) * h..])
        }))
    }

    /// One token for each of `tokens.len()` sequences decoded in lockstep: the cache holds
    /// that many sequences of equal length (start each batch from [`Self::reset`]). Returns
    /// their next-token logits, `[tokens.len(), vocab]` row-major. Many sequences per step
    /// share one pass over the weights, which single-sequence decoding spends on one token.
    pub fn forward_batch(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check(tokens, tokens.len())?;
        Ok(rayon::scope(|_| {
            let x = self.step(tokens, tokens.len());
            self.logits(&x)
        }))
    }

    /// Greedy decoding of `n` tokens after `prompt` (the cache is reset first).
    pub fn generate(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        self.reset();
        let mut out = Vec::with_capacity(n);
        let mut logits = self.forward(prompt)?;
        for _ in 0..n {
            let next = crate::engine::argmax(&logits);
            out.push(next);
            logits = self.forward(&[next])?;
        }
        Ok(out)
    }

    /// Errors unless `tokens` can run on the cache as `batch` sequences.
    fn check(&self, tokens: &[u32], batch: usize) -> Result<()> {
        let v = self.d.vocab;
        if tokens.is_empty() {
            return Err(ModelError::format(
                &self.path,
                "generation was given no tokens to run",
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "token id {t} is outside the vocabulary of {v} (tokenizer and model disagree)"
                ),
            ));
        }
        if self.len > 0 && self.batch != batch {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "the cache holds {} sequences, not {batch} (reset between batches)",
                    self.batch
                ),
            ));
        }
        Ok(())
    }

    /// Runs `tokens` (rows ordered position-major: row `s * batch + b` is sequence `b` at
    /// position `len + s`) through every block, appending to the cache; the final states.
    fn step(&mut self, tokens: &[u32], batch: usize) -> Vec<f32> {
        let d = self.d;
        let (h, hd) = (d.hidden, d.head_dim);
        let m = tokens.len();
        let steps = m / batch;
        if self.len == 0 {
            self.batch = batch;
            let kvd = d.kv_heads * hd;
            for c in self.keys.iter_mut().chain(self.values.iter_mut()) {
                c.reserve(self.max_len.max(steps) * batch * kvd);
            }
        }
        let mut x = Vec::with_capacity(m * h);
        for &t in tokens {
            x.extend_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
        }
        let (cos, sin) =
            crate::transformer::rope_angles(&self.inv_freq, self.len..self.len + steps);
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut a = x.clone();
            rms_norm(&mut a, &blk.ln1, d.eps);
            let (qd, kvd) = (d.heads * hd, d.kv_heads * hd);
            let mut qkv = split_cols(&blk.qkv.forward(&a, m), m, &[qd, kvd, kvd]).into_iter();
            let (mut q, mut k, v) = (
                qkv.next().unwrap(),
                qkv.next().unwrap(),
                qkv.next().unwrap(),
            );
            rotate(&mut q, d.heads, hd, batch, &cos, &sin);
            rotate(&mut k, d.kv_heads, hd, batch, &cos, &sin);
            self.keys[l].extend_from_slice(&k);
            self.values[l].extend_from_slice(&v);
            let ctx = attend(&q, &self.keys[l], &self.values[l], d, batch, self.len);
            let o = blk.o.forward(&ctx, m);
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
            let mut a = x.clone();
            rms_norm(&mut a, &blk.ln2, d.eps);
            let inter = blk.gate_up.out / 2;
            let mut gu = split_cols(&blk.gate_up.forward(&a, m), m, &[inter, inter]).into_iter();
            let (mut g, u) = (gu.next().unwrap(), gu.next().unwrap());
            for (gi, ui) in g.iter_mut().zip(&u) {
                *gi = *gi / (1.0 + (-*gi).exp()) * ui;
            }
            let o = blk.down.forward(&g, m);
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
        }
        self.len += steps;
        x
    }

    /// Logits `[rows, vocab]` of final states `x [rows, hidden]`.
    fn logits(&self, x: &[f32]) -> Vec<f32> {
        let h = self.d.hidden;
        let mut a = x.to_vec();
        rms_norm(&mut a, &self.norm, self.d.eps);
        let w = self.lm_head.as_deref().unwrap_or(&self.embed);
        matmul_t(&a, x.len() / h, w, self.d.vocab, h, None)
    }
}

/// HF `rotate_half` RoPE on rows of `heads * hd` values; row `r` is at step `r / batch`.
fn rotate(x: &mut [f32], heads: usize, hd: usize, batch: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (r, row) in x.chunks_mut(heads * hd).enumerate() {
        let s = r / batch;
        let (c, sn) = (
            &cos[s * half..(s + 1) * half],
            &sin[s * half..(s + 1) * half],
        );
        for head in row.chunks_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * sn[i];
                x2[i] = b * c[i] + a * sn[i];
            }
        }
    }
}

/// Causal attention of the step's queries `q [m, heads * hd]` over the cache (which already
/// holds the step's keys and values); `past` positions were cached before the step.
fn attend(q: &[f32], keys: &[f32], values: &[f32], d: Dims, batch: usize, past: usize) -> Vec<f32> {
    let (nh, hd) = (d.heads, d.head_dim);
    let kvd = d.kv_heads * hd;
    let rep = nh / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (r, head) = (idx / nh, idx % nh);
        let (s, b) = (r / batch, r % batch);
        let g = head / rep;
        let qh = &q[r * nh * hd + head * hd..][..hd];
        let at = |j: usize| (j * batch + b) * kvd + g * hd;
        // Query at absolute position past + s sees keys 0..=past + s.
        let t = past + s + 1;
        let mut w: Vec<f32> = (0..t)
            .map(|j| dot(qh, &keys[at(j)..at(j) + hd]) * scale)
            .collect();
        let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for wj in w.iter_mut() {
            *wj = (*wj - max).exp();
            sum += *wj;
        }
        for (j, wj) in w.iter().enumerate() {
            let p = wj / sum;
            for (oi, vi) in o.iter_mut().zip(&values[at(j)..at(j) + hd]) {
                *oi += p * vi;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::LayerEngine;

    /// The prefill's last logits against the layer engine's (burn) forward pass of the same
    /// window, for a Llama config (grouped heads, untied head) and a Qwen2 one (q/k/v biases,
    /// tied embeddings).
    #[test]
    fn logits_equal_the_layer_engines() {
        let mut qwen = crate::testkit::tiny_config();
        qwen["model_type"] = "qwen2".into();
        qwen["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        qwen["tie_word_embeddings"] = true.into();
        for (i, cfg) in [crate::testkit::tiny_config(), qwen]
            .into_iter()
            .enumerate()
        {
            let dir = tempfile::tempdir().unwrap();
            crate::testkit::write_hf(dir.path(), &cfg, 11 + i as u64, |_, _| {});
            let ckpt = Checkpoint::open(dir.path()).unwrap();
            let window = vec![3u32, 77, 150, 9, 299, 42, 8, 8, 120];
            let engine = LayerEngine::new(&ckpt, crate::default_device(), 16);
            let mut states = engine.embed(std::slice::from_ref(&window)).unwrap();
            engine
                .run_blocks(&mut states, |_, _, _| Ok(()), || {})
                .unwrap();
            let want = engine
                .load_head()
                .unwrap()
                .logits(&states[0], window.len() - 1);
            let mut g = Generator::open(&ckpt, 16).unwrap();
            let got = g.forward(&window).unwrap();
            assert_eq!(got.len(), want.len());
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-4,
                "config {i}: logits differ from the engine's by {diff}"
            );
        }
    }

    /// Logits do not depend on the thread count (outputs are split in fixed slices).
    #[test]
    fn logits_do_not_depend_on_threads() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::testkit::tiny_config();
        // Wider than one slice of output rows, so the split matters.
        cfg["intermediate_size"] = 384.into();
        crate::testkit::write_hf(dir.path(), &cfg, 5, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut g = Generator::open(&ckpt, 8).unwrap();
                let mut l = g.forward(&[4, 5, 6]).unwrap();
                l.extend(g.forward(&[7]).unwrap());
                l
            })
        };
        let one = run(1);
        assert_eq!(one, run(3));
    }

    #[test]
    fn generator_rejects_out_of_range_and_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::testkit::tiny_config();
        cfg["num_hidden_layers"] = 1.into();
        crate::testkit::write_hf(dir.path(), &cfg, 7, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let mut g = Generator::open(&ckpt, 8).unwrap();
        let v = ckpt.config().vocab_size as u32;
        for bad in [vec![v], vec![3, v + 7], vec![u32::MAX]] {
            let e = g.forward(&bad).unwrap_err().to_string();
            assert!(
                e.contains("outside the vocabulary of 300")
                    && e.contains(&dir.path().display().to_string()),
                "{e}"
            );
            // Checked before anything ran: the cache is untouched.
            assert_eq!(g.cached(), 0);
        }
        assert!(g.forward(&[]).is_err());
        assert!(g.generate(&[2, v], 3).is_err());
        // In range still works, and the last id of the vocabulary is in range.
        assert_eq!(g.forward(&[2, v - 1]).unwrap().len(), v as usize);
        assert_eq!(g.generate(&[2, 3], 3).unwrap().len(), 3);
    }

    #[test]
    fn decoding_token_by_token_gives_the_prefills_logits() {
        // tiny_config has 4 query heads on 2 key/value heads: decoding takes the grouped path.
        let dir = tempfile::tempdir().unwrap();
        crate::testkit::write_hf(dir.path(), &crate::testkit::tiny_config(), 9, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let mut g = Generator::open(&ckpt, 16).unwrap();
        let seq = [3u32, 77, 150, 9, 299, 42, 8];
        let prefill = g.forward(&seq).unwrap();
        g.reset();
        let mut step = Vec::new();
        for &t in &seq {
            step = g.forward(&[t]).unwrap();
        }
        let diff = prefill
            .iter()
            .zip(&step)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "decoded logits differ from the prefill's by {diff}"
        );
    }

    #[test]
    fn batched_decoding_gives_each_sequence_its_own_logits() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::testkit::tiny_config();
        crate::testkit::write_hf(dir.path(), &cfg, 7, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let mut g = Generator::open(&ckpt, 8).unwrap();
        // 12 sequences: past the dot-product path's 8 rows, so the gemm path is checked too.
        let seqs: Vec<[u32; 4]> = (0..12u32)
            .map(|i| [5 + i, (9 * i) % 290, 200 - i, (3 + 37 * i) % 290])
            .collect();
        let single: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| {
                g.reset();
                s.iter().map(|&t| g.forward(&[t]).unwrap()).last().unwrap()
            })
            .collect();
        g.reset();
        let mut batched = Vec::new();
        for step in 0..4 {
            let col: Vec<u32> = seqs.iter().map(|s| s[step]).collect();
            batched = g.forward_batch(&col).unwrap();
        }
        let v = ckpt.config().vocab_size;
        assert_eq!(batched.len(), seqs.len() * v);
        for (i, one) in single.iter().enumerate() {
            let diff = one
                .iter()
                .zip(&batched[i * v..(i + 1) * v])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "sequence {i}: batched logits differ by {diff}");
        }
        // A batch of another size on this cache is refused.
        assert!(g.forward_batch(&[1, 2]).is_err());
    }
}
