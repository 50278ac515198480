//! The Llama-family decoder block in burn, with module paths that mirror HF tensor names
//! (`self_attn.q_proj`, `mlp.down_proj`, `input_layernorm`, ...). Mistral, Qwen2, SmolLM2 and
//! TinyLlama are config flags of the same block (GQA, q/k/v bias, RoPE base and scaling).

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
pub use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::Result;

/// Where a calibration tap sits: the input of a group of linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tap {
    /// Normalized block input, shared by q/k/v.
    QkvInput,
    /// Attention context, the input of o_proj.
    OInput,
    /// Normalized residual, shared by gate/up.
    GateUpInput,
    /// SiLU(gate) * up, the input of down_proj.
    DownInput,
}

/// Builds a tensor of `shape` from f32 values.
pub fn tensor_from<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// A burn `Linear` from an HF weight `[out, in]` (burn stores `[in, out]`).
pub fn linear_from_hf(
    weight: Vec<f32>,
    out: usize,
    inp: usize,
    bias: Option<Vec<f32>>,
    device: &Device,
) -> Linear {
    // Transposed once here into contiguous memory: a strided view would be copied by the
    // backend on every matmul, which dominates single-token decoding.
    let w = tensor_from(transpose(&weight, out, inp), [inp, out], device);
    Linear {
        weight: Param::from_tensor(w),
        bias: bias.map(|b| Param::from_tensor(tensor_from(b, [out], device))),
    }
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`, in cache-friendly tiles.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const T: usize = 32;
    let mut out = vec![0f32; data.len()];
    // Each task fills a band of T output rows (= T input columns).
    out.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(band, chunk)| {
            let c0 = band * T;
            let cw = chunk.len() / rows;
            for r0 in (0..rows).step_by(T) {
                for r in r0..(r0 + T).min(rows) {
                    for c in 0..cw {
                        chunk[c * rows + r] = data[r * cols + c0 + c];
                    }
                }
            }
        });
    out
}

/// An RMSNorm from its HF weight.
pub fn rms_norm_from(gamma: Vec<f32>, eps: f64, device: &Device) -> RmsNorm {
    let n = gamma.len();
    RmsNorm {
        gamma: Param::from_tensor(tensor_from(gamma, [n], device)),
        epsilon: eps,
    }
}

/// Rotary position embedding tables (HF `rotate_half` convention).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
    inv_freq: Vec<f64>,
    device: Device,
}

/// cos and sin of every position's RoPE angles, `[positions, inv_freq.len()]` row-major: f64
/// angles rounded to f32 (HF computes them in float32 from an f32 inv_freq; the difference is
/// far below the tolerance of any comparison made here). The layer engine's tables and the
/// decoder's both come from here.
pub fn rope_angles(
    inv_freq: &[f64],
    positions: impl Iterator<Item = usize>,
) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in positions {
        for f in inv_freq {
            let a = p as f64 * *f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Half-width tables repeated for both halves of a head, as HF lays them out:
/// cat(freqs, freqs).
fn full_width((cos, sin): (Vec<f32>, Vec<f32>), half: usize) -> (Vec<f32>, Vec<f32>) {
    let twice = |t: Vec<f32>| {
        t.chunks(half)
            .flat_map(|r| r.iter().chain(r))
            .copied()
            .collect()
    };
    (twice(cos), twice(sin))
}

/// How one window attends: RoPE tables at each token's position, and a mask when tokens
/// do not simply see all earlier tokens (several continuations packed after one context).
#[derive(Debug, Clone)]
pub struct WindowLayout {
    cos: Tensor<2>,
    sin: Tensor<2>,
    /// `[1, heads, seq, seq]`, true where attention is blocked; `None` means causal.
    mask: Option<Tensor<4, Bool>>,
}

impl Rope {
    /// Tables for positions `0..max_len`.
    pub fn new(cfg: &Config, max_len: usize, device: &Device) -> Self {
        let inv = cfg.rope_inv_freq();
        let hd = cfg.head_dim();
        let (cos, sin) = full_width(rope_angles(&inv, 0..max_len), inv.len());
        Self {
            cos: tensor_from(cos, [max_len, hd], device),
            sin: tensor_from(sin, [max_len, hd], device),
            inv_freq: inv,
            device: device.clone(),
        }
    }

    fn tables(&self, positions: &[usize]) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let (cos, sin) = full_width(rope_angles(&self.inv_freq, positions.iter().copied()), half);
        let n = positions.len();
        (
            tensor_from(cos, [n, 2 * half], &self.device),
            tensor_from(sin, [n, 2 * half], &self.device),
        )
    }

    /// A layout for tokens at `positions`. With `segments`, token i sees token j <= i only
    /// when j is in segment 0 (the shared context) or in i's own segment; without, it is
    /// plain causal attention.
    pub fn layout(
        &self,
        positions: &[usize],
        segments: Option<&[u32]>,
        n_heads: usize,
    ) -> WindowLayout {
        let (cos, sin) = self.tables(positions);
        let mask = segments.map(|seg| {
            let n = seg.len();
            let mut m = vec![true; n * n];
            for i in 0..n {
                for j in 0..=i {
                    m[i * n + j] = !(seg[j] == 0 || seg[j] == seg[i]);
                }
            }
            Tensor::<4, Bool>::from_data(TensorData::new(m, [1, 1, n, n]), &self.device)
                .repeat_dim(1, n_heads)
        });
        WindowLayout { cos, sin, mask }
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` for positions `0..seq`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let seq = x.dims()[2];
        rotate(
            x,
            self.cos.clone().slice([0..seq]),
            self.sin.clone().slice([0..seq]),
        )
    }
}

/// Rotates `x` `[batch, heads, seq, head_dim]` with tables `[seq, head_dim]`.
fn rotate(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    if crate::fused::applies(&x.device(), x.dtype()) {
        return crate::fused::rope(x, cos, sin);
    }
    let hd = x.dims()[3];
    let (cos, sin) = (cos.unsqueeze::<4>(), sin.unsqueeze::<4>());
    let x1 = x.clone().narrow(3, 0, hd / 2);
    let x2 = x.clone().narrow(3, hd / 2, hd / 2);
    let rot = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rot * sin
}

/// Where the tokens of a forward pass sit.
pub enum Positions<'a> {
    /// Positions `0..seq`, causal.
    Causal(&'a Rope),
    /// Explicit positions and mask.
    Layout(&'a WindowLayout),
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        pos: Positions<'_>,
        tap: &mut dyn FnMut(Tap, &Tensor<3>),
    ) -> Tensor<3> {
        let ctx = self.context(x, pos);
        tap(Tap::OInput, &ctx);
        self.o_proj.forward(ctx)
    }

    /// The attention context `[batch, seq, heads * head_dim]`: everything before `o_proj`.
    pub fn context(&self, x: Tensor<3>, pos: Positions<'_>) -> Tensor<3> {
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.attend(q, k, v, pos)
    }

    /// Attention over projected queries, keys and values `[batch, seq, heads * head_dim]`.
    fn attend(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, pos: Positions<'_>) -> Tensor<3> {
        let [b, s, _] = q.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let (q, k, v) = (heads(q, nh), heads(k, nkv), heads(v, nkv));
        let (q, k, v, mask, causal) = match pos {
            Positions::Causal(rope) => (rope.apply(q), rope.apply(k), v, None, true),
            Positions::Layout(l) => {
                let (q, k) = (
                    rotate(q, l.cos.clone(), l.sin.clone()),
                    rotate(k, l.cos.clone(), l.sin.clone()),
                );
                (q, k, v, l.mask.clone(), l.mask.is_none())
            }
        };
        let t = k.dims()[2];
        let fused =
            causal && mask.is_none() && s == t && crate::fused::applies(&q.device(), q.dtype());
        if fused {
            // Grouped keys and values go in as they are: the kernel maps each query head to
            // its key/value head.
            let out = crate::attention::causal_attention(q, k, v, 1.0 / (hd as f32).sqrt());
            return out.swap_dims(1, 2).reshape([b, s, nh * hd]);
        }
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let expand = |x: Tensor<4>| {
                x.reshape([b, nkv, 1, t, hd])
                    .repeat_dim(2, rep)
                    .reshape([b, nh, t, hd])
            };
            (expand(k), expand(v))
        } else {
            (k, v)
        };
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        let out = attention(q, k, v, mask, None, opts);
        out.swap_dims(1, 2).reshape([b, s, nh * hd])
    }
}

/// The SwiGLU feed-forward network.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<3>, tap: &mut dyn FnMut(Tap, &Tensor<3>)) -> Tensor<3> {
        let h = crate::fused::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        tap(Tap::DownInput, &h);
        self.down_proj.forward(h)
    }
}

/// One decoder block (HF `LlamaDecoderLayer`).
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Attention.
    pub self_attn: Attention,
    /// Feed-forward.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Reads block `l` from a checkpoint (one block's weights, converted to f32).
    pub fn load(ckpt: &Checkpoint, l: usize, device: &Device) -> Result<Self> {
        let p = format!("model.layers.{l}");
        Self::from_fn(
            ckpt.config(),
            |name, shape| ckpt.read(&format!("{p}.{name}"), shape),
            device,
        )
    }

    /// Builds a block from HF-named weights (`self_attn.q_proj.weight`, ...) that `get`
    /// returns in HF layout for the shape asked.
    pub fn from_fn(
        c: &Config,
        mut get: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
        device: &Device,
    ) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim();
        let kv = c.num_kv_heads() * c.head_dim();
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(linear_from_hf(w, out, inp, b, device))
        };
        let eps = c.rms_norm_eps;
        let self_attn = Attention {
            q_proj: lin("self_attn.q_proj", q, h, c.qkv_bias())?,
            k_proj: lin("self_attn.k_proj", kv, h, c.qkv_bias())?,
            v_proj: lin("self_attn.v_proj", kv, h, c.qkv_bias())?,
            o_proj: lin("self_attn.o_proj", h, q, c.o_bias())?,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
        };
        let mlp = Mlp {
            gate_proj: lin("mlp.gate_proj", i, h, c.mlp_bias)?,
            up_proj: lin("mlp.up_proj", i, h, c.mlp_bias)?,
            down_proj: lin("mlp.down_proj", h, i, c.mlp_bias)?,
        };
        Ok(Self {
            input_layernorm: rms_norm_from(get("input_layernorm.weight", &[h])?, eps, device),
            self_attn,
            post_attention_layernorm: rms_norm_from(
                get("post_attention_layernorm.weight", &[h])?,
                eps,
                device,
            ),
            mlp,
        })
    }

    /// Runs the block on `x` `[batch, seq, hidden]` at positions `0..seq`.
    pub fn forward(&self, x: Tensor<3>, rope: &Rope) -> Tensor<3> {
        self.forward_at(x, Positions::Causal(rope), &mut |_, _| {})
    }

    /// Runs the block and shows `tap` the input of every linear group (for calibration).
    pub fn forward_tapped(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        tap: &mut dyn FnMut(Tap, &Tensor<3>),
    ) -> Tensor<3> {
        self.forward_at(x, Positions::Causal(rope), tap)
    }

    /// Runs the block over several windows `[1, len_i, hidden]` at once: the linear layers
    /// see all their tokens as one matrix (short windows alone keep the cores idle), the
    /// attention stays per window, causal or with window `i`'s layout.
    pub fn forward_windows(
        &self,
        xs: Vec<Tensor<3>>,
        layouts: Option<&[WindowLayout]>,
        rope: &Rope,
    ) -> Vec<Tensor<3>> {
        let pos = |i: usize| match layouts {
            Some(ls) => Positions::Layout(&ls[i]),
            None => Positions::Causal(rope),
        };
        if xs.len() == 1 {
            let x = xs.into_iter().next().expect("one window");
            return vec![self.forward_at(x, pos(0), &mut |_, _| {})];
        }
        let lens: Vec<usize> = xs.iter().map(|x| x.dims()[1]).collect();
        let x = Tensor::cat(xs, 1);
        let n = crate::fused::rms_norm(&self.input_layernorm, x.clone());
        let a = &self.self_attn;
        let (q, k, v) = (
            a.q_proj.forward(n.clone()),
            a.k_proj.forward(n.clone()),
            a.v_proj.forward(n),
        );
        let mut ctx = Vec::with_capacity(lens.len());
        let mut off = 0;
        for (i, &len) in lens.iter().enumerate() {
            let part = |t: &Tensor<3>| t.clone().narrow(1, off, len);
            ctx.push(a.attend(part(&q), part(&k), part(&v), pos(i)));
            off += len;
        }
        let h = x + a.o_proj.forward(Tensor::cat(ctx, 1));
        let n = crate::fused::rms_norm(&self.post_attention_layernorm, h.clone());
        let out = h + self.mlp.forward(n, &mut |_, _| {});
        let mut off = 0;
        lens.iter()
            .map(|&len| {
                let w = out.clone().narrow(1, off, len);
                off += len;
                w
            })
            .collect()
    }

    /// Runs the block with explicit positions (packed windows, or a KV cache).
    pub fn forward_at(
        &self,
        x: Tensor<3>,
        pos: Positions<'_>,
        tap: &mut dyn FnMut(Tap, &Tensor<3>),
    ) -> Tensor<3> {
        let n = crate::fused::rms_norm(&self.input_layernorm, x.clone());
        tap(Tap::QkvInput, &n);
        let h = x + self.self_attn.forward(n, pos, tap);
        let n = crate::fused::rms_norm(&self.post_attention_layernorm, h.clone());
        tap(Tap::GateUpInput, &n);
        h + self.mlp.forward(n, tap)
    }
}
