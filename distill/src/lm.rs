//! The whole causal LM as one burn module, for training: the embedding, the engine's own
//! [`DecoderLayer`]s (so training and inference share one model definition), the final norm
//! and the output projection. Built from any readable checkpoint and written back with HF
//! tensor names.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use model::transformer::{
    DecoderLayer, Rope, linear_from_hf, rms_norm_from, tensor_from, transpose,
};
use model::{Checkpoint, Config};

use crate::Result;

/// A Llama-family causal language model held whole in memory (trainable).
#[derive(Module, Debug)]
pub struct CausalLm {
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<2>>,
    /// The decoder blocks.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head`; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Learned projections of chosen block outputs to the teacher's width, for a hidden-state
    /// loss between models of different widths (trained, never written with the model).
    pub hidden_proj: Vec<Linear>,
}

impl CausalLm {
    /// Loads every tensor of `ckpt` onto `device` (f32; quantized formats are dequantized).
    pub fn load(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        Self::from_fn(ckpt.config(), |name, shape| ckpt.read(name, shape), device)
    }

    /// Builds the model from HF-named tensors that `get` returns in HF layout for the shape
    /// asked.
    pub fn from_fn(
        c: &Config,
        mut get: impl FnMut(&str, &[usize]) -> model::Result<Vec<f32>>,
        device: &Device,
    ) -> Result<Self> {
        let (v, h) = (c.vocab_size, c.hidden_size);
        let embed = get("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                DecoderLayer::from_fn(c, |n, s| get(&format!("{p}.{n}"), s), device)
            })
            .collect::<model::Result<Vec<_>>>()?;
        let norm = rms_norm_from(get("model.norm.weight", &[h])?, c.rms_norm_eps, device);
        // A tied model trains one matrix for both ends, as HF does (a stray lm_head is ignored).
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let w = get("lm_head.weight", &[v, h])?;
            Some(linear_from_hf(w, v, h, None, device))
        };
        Ok(Self {
            embed_tokens: Param::from_tensor(tensor_from(embed, [v, h], device)),
            layers,
            norm,
            lm_head,
            hidden_proj: Vec::new(),
        })
    }

    /// Adds one learned projection `[hidden, width]` per entry of `widths` (uniform in
    /// ±1/sqrt(hidden), burn's default, from the device's seeded generator).
    pub fn with_projections(mut self, widths: &[usize]) -> Self {
        let device = self.embed_tokens.val().device();
        let h = self.embed_tokens.val().dims()[1];
        self.hidden_proj = widths
            .iter()
            .map(|&w| {
                burn::nn::LinearConfig::new(h, w)
                    .with_bias(false)
                    .init(&device)
            })
            .collect();
        self
    }

    /// Final hidden states `[batch, seq, hidden]` of equally long token windows, and the
    /// outputs of blocks `taps` (in the order given).
    pub fn hidden(
        &self,
        windows: &[Vec<u32>],
        rope: &Rope,
        taps: &[usize],
    ) -> (Tensor<3>, Vec<Tensor<3>>) {
        let b = windows.len();
        let s = windows.first().map_or(0, Vec::len);
        assert!(
            windows.iter().all(|w| w.len() == s),
            "CausalLm::hidden: windows of one batch must have one length"
        );
        let ids: Vec<i64> = windows.iter().flatten().map(|&t| t as i64).collect();
        let table = self.embed_tokens.val();
        let device = table.device();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [b * s]), &device);
        let h = table.dims()[1];
        let mut x = table.select(0, ids).reshape([b, s, h]);
        let mut tapped: Vec<Option<Tensor<3>>> = vec![None; taps.len()];
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, rope);
            for (slot, _) in tapped.iter_mut().zip(taps).filter(|(_, t)| **t == l) {
                *slot = Some(x.clone());
            }
        }
        let tapped = tapped
            .into_iter()
            .map(|t| t.expect("tapped block index within the model"))
            .collect();
        (model::fused::rms_norm(&self.norm, x), tapped)
    }

    /// Logits `[batch * seq, vocab]` of equally long windows, rows in window-major order.
    pub fn logits(&self, windows: &[Vec<u32>], rope: &Rope) -> Tensor<2> {
        self.logits_and_hidden(windows, rope, &[]).0
    }

    /// Logits as [`Self::logits`], and the outputs of blocks `taps` as `[batch * seq, hidden]`.
    pub fn logits_and_hidden(
        &self,
        windows: &[Vec<u32>],
        rope: &Rope,
        taps: &[usize],
    ) -> (Tensor<2>, Vec<Tensor<2>>) {
        let (x, tapped) = self.hidden(windows, rope, taps);
        let [b, s, h] = x.dims();
        let x = x.reshape([b * s, h]);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.embed_tokens.val().transpose()),
        };
        (
            logits,
            tapped.into_iter().map(|t| t.reshape([b * s, h])).collect(),
        )
    }

    /// Shows `f` every parameter with its HF name, in HF order.
    pub fn for_each_param(&self, f: &mut dyn FnMut(&str, ParamRef<'_>)) {
        f(
            "model.embed_tokens.weight",
            ParamRef::Plain2(&self.embed_tokens),
        );
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let a = &layer.self_attn;
            let m = &layer.mlp;
            f(
                &format!("{p}.input_layernorm.weight"),
                ParamRef::Vector(&layer.input_layernorm.gamma),
            );
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
            ] {
                linear_params(f, &format!("{p}.{name}"), lin);
            }
            f(
                &format!("{p}.post_attention_layernorm.weight"),
                ParamRef::Vector(&layer.post_attention_layernorm.gamma),
            );
            for (name, lin) in [
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                linear_params(f, &format!("{p}.{name}"), lin);
            }
        }
        f("model.norm.weight", ParamRef::Vector(&self.norm.gamma));
        if let Some(head) = &self.lm_head {
            linear_params(f, "lm_head", head);
        }
        for (i, p) in self.hidden_proj.iter().enumerate() {
            linear_params(f, &format!("distill.hidden_proj.{i}"), p);
        }
    }

    /// Every tensor with its HF name, in HF layout (`[out, in]` weights), as f32.
    pub fn hf_tensors(&self) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        self.for_each_param(&mut |name, p| {
            out.insert(name.to_string(), p.hf_values(p.value()));
        });
        out
    }

    /// The gradient of every parameter that has one, by HF name and in HF layout.
    pub fn hf_grads(&self, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        self.for_each_param(&mut |name, p| {
            if let Some(g) = p.grad(grads) {
                out.insert(name.to_string(), p.hf_values(g));
            }
        });
        out
    }
}

/// A parameter as [`CausalLm::for_each_param`] shows it.
pub enum ParamRef<'a> {
    /// A matrix stored as is (the embedding; LoRA factors, named `.lora_a` `[in, r]` and
    /// `.lora_b` `[r, out]` after their weight).
    Plain2(&'a Param<Tensor<2>>),
    /// A linear weight, stored `[in, out]` (HF's transpose).
    Linear(&'a Param<Tensor<2>>),
    /// A vector (norm weight, bias).
    Vector(&'a Param<Tensor<1>>),
}

impl ParamRef<'_> {
    /// The current value, flattened as stored.
    fn value(&self) -> Stored {
        match self {
            Self::Plain2(p) | Self::Linear(p) => Stored::M(p.val()),
            Self::Vector(p) => Stored::V(p.val()),
        }
    }

    fn grad(&self, grads: &GradientsParams) -> Option<Stored> {
        match self {
            Self::Plain2(p) | Self::Linear(p) => grads.get::<2>(p.id).map(Stored::M),
            Self::Vector(p) => grads.get::<1>(p.id).map(Stored::V),
        }
    }

    /// Values of a tensor stored like this parameter, in HF layout.
    fn hf_values(&self, t: Stored) -> Vec<f32> {
        match (self, t) {
            (Self::Linear(_), Stored::M(m)) => {
                let [inp, out] = m.dims();
                transpose(&values(m), inp, out)
            }
            (_, Stored::M(m)) => values(m),
            (_, Stored::V(v)) => values(v),
        }
    }
}

/// A stored tensor of either rank.
enum Stored {
    M(Tensor<2>),
    V(Tensor<1>),
}

/// A linear's weight and bias as [`ParamRef`]s.
fn linear_params(f: &mut dyn FnMut(&str, ParamRef<'_>), name: &str, lin: &Linear) {
    f(&format!("{name}.weight"), ParamRef::Linear(&lin.weight));
    if let Some(ad) = crate::qlora::adapter_of(&lin.weight) {
        f(&format!("{name}.lora_a"), ParamRef::Plain2(&ad.a));
        f(&format!("{name}.lora_b"), ParamRef::Plain2(&ad.b));
    }
    if let Some(b) = &lin.bias {
        f(&format!("{name}.bias"), ParamRef::Vector(b));
    }
}

/// A tensor's values, row-major f32.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor data")
}
