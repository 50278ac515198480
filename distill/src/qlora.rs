//! QLoRA (Dettmers et al., 2023, arXiv:2305.14314): the frozen student's decoder linears
//! (q/k/v/o, gate/up/down) are held in a 4-bit bitsandbytes scheme (NF4: packed codes and
//! per-block absmax, optionally double-quantized; `quant::nf4`) and dequantized on the fly in
//! every forward pass; LoRA adapters on the targeted linears train in f32 on top.
//!
//! It is one burn reparameterization per linear weight ([`Nf4Base`]): its stored state is the
//! packed codes and absmax values in plain Rust memory, outside the autodiff graph, plus the
//! optional LoRA factors (burn's own [`LoraAdapter`], so they train, checkpoint and export as
//! plain LoRA's do). The parameter's own tensor is replaced by a `[1, 1]` placeholder, so the
//! f32 weight is not kept. `apply` returns `dequantize(codes, absmax) + (alpha / r) · A·B`; the
//! dequantized base is a constant (no gradient reaches it).
//!
//! The base is dequantized as bitsandbytes does with its default compute dtype bf16 (QLoRA's
//! setting): `code * absmax` in f32, rounded to bf16 (nearest, ties to even). So the forward
//! weights at step 0 are exactly the dense output of `compress quant --scheme nf4` (tested).

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{LoraAdapter, Module, Param, ParamId, Reparameterization, Reparameterizer};
use burn::tensor::{Distribution, Shape, Tensor, TensorData};
use model::transformer::transpose;
use quant::nf4::{Absmax, BnbLinear, BnbScheme, quantize};
use serde::Serialize;

use crate::lm::{CausalLm, values};
use crate::loftq::{LoraInit, loftq};
use crate::lora::LoraOptions;
use crate::{DistillError, Result};

/// One linear weight held in a 4-bit codebook scheme.
#[derive(Debug)]
pub struct Nf4Weight {
    /// Output channels (HF rows).
    pub rows: usize,
    /// Input channels (HF columns).
    pub cols: usize,
    /// Values per absmax block of the row-major HF weight.
    pub block: usize,
    /// Codes two per byte in HF row-major order, the first of each pair in the high nibble
    /// (bitsandbytes' packing).
    pub packed: Vec<u8>,
    /// The block scales: f32 absmax values, or their double quantization.
    pub absmax: Absmax,
    /// The 16-entry codebook.
    pub codebook: &'static [f32; 16],
}

/// `x` rounded to the nearest bf16 (ties to even) and widened back to f32: the same value as
/// `half::bf16::from_f32(x).to_f32()` for finite `x`, which is what the dense writer stores.
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    f32::from_bits(r & 0xffff_0000)
}

impl Nf4Weight {
    /// Holds a quantized linear (4-bit types only).
    pub fn from_linear(q: &BnbLinear) -> Result<Self> {
        let (Some(codebook), Some(block)) = (q.scheme.ty.codebook(), q.scheme.block) else {
            return Err(DistillError::Invalid(format!(
                "{}: not a 4-bit block scheme",
                q.scheme.label()
            )));
        };
        let packed = q
            .packed()
            .map_err(|e| DistillError::Invalid(e.to_string()))?;
        Ok(Self {
            rows: q.rows,
            cols: q.cols,
            block,
            packed,
            absmax: q.absmax.clone(),
            codebook,
        })
    }

    /// Bytes held: the packed codes and the absmax state (plain: one f32 per block; double
    /// quantization: one byte per block, one f32 per group of 256 blocks and the f32 offset),
    /// counted as `BnbScheme::bits_per_weight` counts bits.
    pub fn resident_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::Plain(a) => 4 * a.len(),
            Absmax::Double(d) => d.codes.len() + 4 * d.nested_absmax.len() + 4,
        };
        self.packed.len() + scales
    }

    /// The dequantized weight in HF layout `[rows, cols]`, each value rounded to bf16 (see the
    /// module docs).
    pub fn dequantize_hf(&self) -> Vec<f32> {
        let scales = match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.absmax(),
        };
        (0..self.rows * self.cols)
            .map(|i| round_bf16(self.codebook[self.code(i)] * scales[i / self.block]))
            .collect()
    }

    /// The `i`-th code of the row-major weight.
    #[inline]
    fn code(&self, i: usize) -> usize {
        let byte = self.packed[i / 2];
        (if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 15
        }) as usize
    }

    /// The dequantized weight in burn's layout `[cols, rows]`.
    fn dequantize_burn(&self) -> Vec<f32> {
        transpose(&self.dequantize_hf(), self.rows, self.cols)
    }
}

/// The reparameterization of one linear weight: a 4-bit base dequantized on the fly, with
/// optional trainable LoRA factors on top.
#[derive(Module, Debug)]
pub struct Nf4Base {
    /// The adapter, on a targeted linear.
    pub lora: Option<LoraAdapter>,
    /// The packed base (shared by clones, never trained).
    #[module(skip)]
    pub weight: Arc<Nf4Weight>,
}

impl Reparameterization for Nf4Base {
    const NAME: &'static str = "nf4_base";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let w = &self.weight;
        let dims = [w.cols, w.rows];
        let deq =
            Tensor::<2>::from_data(TensorData::new(w.dequantize_burn(), dims), &base.device());
        let eff = match &self.lora {
            Some(l) => deq + l.delta(),
            None => deq,
        };
        eff.reshape(Shape::from(dims.to_vec()))
    }
}

/// The LoRA factors of a weight, whether on a dense base or on a 4-bit one.
pub fn adapter_of(p: &Param<Tensor<2>>) -> Option<&LoraAdapter> {
    p.adapter()
        .or_else(|| p.reparameterization::<Nf4Base>()?.lora.as_ref())
}

/// Freezes every tensor, puts the decoder linears named in `ids` in the 4-bit scheme and
/// attaches adapters to those marked targeted.
struct Attach {
    scheme: BnbScheme,
    rank: usize,
    alpha: f64,
    init: LoraInit,
    ids: HashMap<ParamId, (String, bool)>,
}

impl Reparameterizer for Attach {
    type Reparam = Nf4Base;

    fn reparameterize<const D: usize>(
        &mut self,
        _path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<Nf4Base>) {
        let param = param.set_require_grad(false);
        let Some((name, targeted)) = self.ids.get(&param.id).filter(|_| D == 2) else {
            return (param, None);
        };
        let t = param.base();
        let device = t.device();
        let dims = t.dims();
        let (inp, out) = (dims[0], dims[1]);
        let hf = transpose(&values(t), inp, out);
        let scale = self.alpha / self.rank as f64;
        let (q, lora) = match (self.init, targeted) {
            (LoraInit::Loftq { iters }, true) => {
                let s = loftq(&self.scheme, name, &hf, out, inp, self.rank, iters)
                    .expect("widths checked before");
                // scale·A·B = (L·R)ᵀ in burn's [in, out] layout: A = Rᵀ/√scale, B = Lᵀ/√scale.
                let root = scale.sqrt() as f32;
                let r = self.rank.min(inp).min(out);
                let a = transpose(&s.right, r, inp)
                    .iter()
                    .map(|x| x / root)
                    .collect();
                let b = transpose(&s.left, out, r)
                    .iter()
                    .map(|x| x / root)
                    .collect();
                let lora = LoraAdapter {
                    a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [inp, r]), &device)),
                    b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [r, out]), &device)),
                    scale,
                };
                (s.base, Some(lora))
            }
            _ => {
                let q = quantize(&self.scheme, name, &hf, out, inp).expect("widths checked before");
                let lora = targeted.then(|| {
                    // As burn's `Lora`: A ~ N(0, 1/r), B = 0, from the device's seeded generator.
                    let std = 1.0 / self.rank as f64;
                    let a = Tensor::<2>::random(
                        [inp, self.rank],
                        Distribution::Normal(0.0, std),
                        &device,
                    );
                    let b = Tensor::<2>::zeros([self.rank, out], &device);
                    LoraAdapter {
                        a: Param::from_tensor(a),
                        b: Param::from_tensor(b),
                        scale,
                    }
                });
                (q, lora)
            }
        };
        let weight = Nf4Weight::from_linear(&q).expect("scheme checked before");
        // The f32 weight is dropped: the parameter keeps a placeholder of the same rank.
        let param = param.map(|t| Tensor::<D>::zeros(Shape::from(vec![1; D]), &t.device()));
        let reparam = Nf4Base {
            lora,
            weight: Arc::new(weight),
        };
        (param, Some(reparam))
    }
}

/// What the 4-bit base holds, against the f32 weights it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BaseBytes {
    /// Linears held in the 4-bit scheme.
    pub linears: usize,
    /// Their weights.
    pub params: u64,
    /// Bytes resident for them: packed codes and absmax state.
    pub resident_bytes: u64,
    /// Bytes the same weights take in f32.
    pub f32_bytes: u64,
}

impl BaseBytes {
    /// Stored bits per weight (`8 * resident_bytes / params`).
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.resident_bytes as f64 / (self.params.max(1)) as f64
    }
}

impl CausalLm {
    /// QLoRA: freezes every tensor, holds every decoder linear in the 4-bit `scheme` (its f32
    /// weight dropped) and attaches LoRA adapters to `lora.targets`, started as LoRA's.
    /// Refused for a scheme without a 4-bit codebook, or a block that does not divide an
    /// input width.
    pub fn with_4bit_lora(self, lora: &LoraOptions, scheme: &BnbScheme) -> Result<Self> {
        self.with_4bit_lora_init(lora, scheme, LoraInit::Gaussian)
    }

    /// [`Self::with_4bit_lora`] with the adapters started by `init` (LoftQ: base and adapters
    /// chosen together, [`crate::loftq`]).
    pub fn with_4bit_lora_init(
        self,
        lora: &LoraOptions,
        scheme: &BnbScheme,
        init: LoraInit,
    ) -> Result<Self> {
        if init == (LoraInit::Loftq { iters: 0 }) {
            return Err(DistillError::Invalid(
                "--loftq-iter must be at least 1".into(),
            ));
        }
        if scheme.ty.codebook().is_none() || scheme.block.is_none() {
            return Err(DistillError::Invalid(format!(
                "--base-scheme {}: a 4-bit block scheme is needed",
                scheme.ty.name()
            )));
        }
        let targeted = self.target_ids(&lora.targets);
        let mut ids = HashMap::new();
        for (name, w) in self.qat_weights() {
            if w.reparameterization::<Nf4Base>().is_some() || w.adapter().is_some() {
                return Err(DistillError::Invalid(format!(
                    "{name}: already has a reparameterization"
                )));
            }
            let inp = w.base().dims()[0];
            scheme
                .check_width(&name, inp)
                .map_err(|e| DistillError::Invalid(e.to_string()))?;
            let t = targeted.contains(&w.id);
            ids.insert(w.id, (name, t));
        }
        Ok(self.apply_reparameterization(Attach {
            scheme: *scheme,
            rank: lora.rank,
            alpha: lora.alpha,
            init,
            ids,
        }))
    }

    /// Every 4-bit base by HF name, dequantized (HF layout, bf16 values), without adapters.
    pub fn base_4bit_weights(&self) -> Vec<(String, Vec<f32>)> {
        self.qat_weights()
            .into_iter()
            .filter_map(|(name, w)| {
                let r = w.reparameterization::<Nf4Base>()?;
                Some((name, r.weight.dequantize_hf()))
            })
            .collect()
    }

    /// The bytes the 4-bit bases hold (zero linears when there are none).
    pub fn base_4bit_bytes(&self) -> BaseBytes {
        let mut b = BaseBytes {
            linears: 0,
            params: 0,
            resident_bytes: 0,
            f32_bytes: 0,
        };
        for (_, w) in self.qat_weights() {
            if let Some(r) = w.reparameterization::<Nf4Base>() {
                let n = (r.weight.rows * r.weight.cols) as u64;
                b.linears += 1;
                b.params += n;
                b.resident_bytes += r.weight.resident_bytes() as u64;
                b.f32_bytes += 4 * n;
            }
        }
        b
    }
}
