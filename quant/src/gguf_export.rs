//! Export of any readable checkpoint to a quantized GGUF file that llama.cpp and this
//! toolkit load: metadata as llama.cpp's converter writes it, tensors in GGUF naming and
//! layout, each quantized with [`crate::blocks`] to the type a [`TypePlan`] picks. Tensors
//! stream one at a time (read f32, quantize, write), so the model is never whole in memory.
//!
//! * Architectures: HF `llama`/`mistral` are written as GGUF `llama` (q/k rows permuted to
//!   llama.cpp's interleaved rotary layout with [`model::gguf::permute_rows`], weights and
//!   biases), `qwen2` as `qwen2` (no permutation). RoPE scaling other than `default` is
//!   refused (the GGUF reader here cannot read it back).
//! * Tokenizer: from a GGUF source every `tokenizer.*` key is copied with its exact type. From
//!   an HF folder it is built from `tokenizer.json` as llama.cpp's `gpt2` (byte-level BPE)
//!   model: tokens by id (padded with `[PADi]` of type UNUSED up to `vocab_size`), token types
//!   (CONTROL for special added tokens, USER_DEFINED for other added tokens, NORMAL else),
//!   merges, bos/eos/unk ids, `add_bos_token`, `tokenizer.chat_template` from
//!   `tokenizer_config.json`. `tokenizer.ggml.pre` is recognised from the pre-tokenizer's shape:
//!   ByteLevel alone -> `gpt-2`, Digits(individual) + ByteLevel -> `smollm`, the Llama-3 split
//!   regex -> `llama-bpe`, the Qwen2 split regex -> `qwen2`; anything else is written as
//!   `default` with a warning (**limitation**: llama.cpp identifies pre-tokenizers by hashing
//!   the tokenization of a probe text, which this does not do). SentencePiece-style
//!   tokenizers (BPE with byte fallback, Unigram) are refused from HF folders: export them
//!   from a GGUF source instead.
//! * 1-D tensors (norms, biases) are always F32.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use model::Checkpoint;
use model::gguf::writer::{GgufWriter, TensorDecl};
use model::gguf::{GgmlType, gguf_to_hf_name, permute_rows};

use crate::blocks::{BlockError, quantize};
use crate::gguf_meta::metadata;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the source or writing the file.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// A quantizer refused a tensor.
    #[error("tensor `{tensor}`: {source}")]
    Block {
        /// GGUF name.
        tensor: String,
        /// Why.
        source: BlockError,
    },
    /// Anything else (unsupported architecture or tokenizer, bad plan).
    #[error("{0}")]
    Input(String),
}

/// An export's result.
pub(crate) type Result<T> = std::result::Result<T, ExportError>;

pub use crate::gguf_plan::{
    PRESETS, TypePlan, TypeRule, fallback_type, file_type_of, hf_to_gguf_name, pattern_matches,
    type_names, use_more_bits,
};

/// Reported after each tensor is written.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    /// 1-based index of the tensor just written.
    pub index: usize,
    /// Number of tensors.
    pub total: usize,
    /// Its GGUF name.
    pub name: &'a str,
    /// Its type.
    pub ty: GgmlType,
}

/// One written tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedTensor {
    /// GGUF name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The type the plan asked for.
    pub planned: GgmlType,
    /// The type written (differs after a fallback).
    pub ty: GgmlType,
    /// Bytes of data.
    pub bytes: usize,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Every tensor in file order.
    pub tensors: Vec<ExportedTensor>,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Messages worth showing (tokenizer limitations).
    pub warnings: Vec<String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl ExportReport {
    /// Number of weights.
    pub fn params(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }
    /// Bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes as u64).sum()
    }
    /// Bits per weight over all tensor data.
    pub fn bpw(&self) -> f64 {
        self.tensor_bytes() as f64 * 8.0 / self.params().max(1) as f64
    }
    /// Tensors whose planned type did not fit their rows.
    pub fn fallbacks(&self) -> impl Iterator<Item = &ExportedTensor> {
        self.tensors.iter().filter(|t| t.planned != t.ty)
    }
    /// Tensor count per written type, by type name.
    pub fn type_counts(&self) -> Vec<(&'static str, usize)> {
        let mut m: Vec<(&'static str, usize)> = Vec::new();
        for t in &self.tensors {
            match m.iter_mut().find(|(n, _)| *n == t.ty.name()) {
                Some(e) => e.1 += 1,
                None => m.push((t.ty.name(), 1)),
            }
        }
        m
    }
}

/// Writes `ckpt` as a GGUF file at `out` (the caller writes to a temporary name and renames),
/// with types from `plan`. `importance` maps a tensor's HF name (or its GGUF name) to one
/// weight per input column (e.g. E[x_j^2] of the activations that multiply it); tensors
/// without an entry use plain rounding. For tied embeddings the entry of `lm_head.weight` or
/// `output.weight` is used for `token_embd.weight` if it has none of its own.
pub fn export(
    ckpt: &Checkpoint,
    out: &Path,
    plan: &TypePlan,
    importance: Option<&HashMap<String, Vec<f32>>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ExportReport> {
    let tied = ckpt.config().tie_word_embeddings && !ckpt.has("lm_head.weight");
    let lookup = |hf: &str, g: &str| -> Option<Vec<f32>> {
        let m = importance?;
        m.get(hf)
            .or_else(|| m.get(g))
            .or_else(|| {
                (tied && g == "token_embd.weight")
                    .then(|| m.get("lm_head.weight").or_else(|| m.get("output.weight")))?
            })
            .cloned()
    };
    let mut source = |hf: &str, g: &str, shape: &[usize]| -> Result<Source> {
        Ok(Source {
            data: ckpt.read(hf, shape)?,
            importance: lookup(hf, g),
            encoded: None,
        })
    };
    export_from(ckpt, out, plan, &mut source, progress)
}

/// One tensor as a [`export_from`] source hands it over: values in HF layout and, for
/// matrices, the importance of each input column (`None` for plain rounding).
pub struct Source {
    /// Values, HF layout, f32 (may be empty when `encoded` is given).
    pub data: Vec<f32>,
    /// One weight per input column.
    pub importance: Option<Vec<f32>>,
    /// The tensor already encoded in the type the plan gives it (rows in HF order), written
    /// as it is instead of rounding `data` (e.g. a quantization-aware-trained grid kept by
    /// [`crate::blocks::legacy::encode_on_grid`]).
    pub encoded: Option<Vec<u8>>,
}

/// As [`export`], with every tensor's values and importance from `source(hf name, gguf
/// name, shape)`, asked once per tensor in file order (embedding, blocks in order, final
/// norm, lm_head), so a source may compute block `l` when its first tensor is asked for.
/// The architecture, shapes and metadata come from `ckpt`.
pub fn export_from(
    ckpt: &Checkpoint,
    out: &Path,
    plan: &TypePlan,
    source: &mut dyn FnMut(&str, &str, &[usize]) -> Result<Source>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ExportReport> {
    let start = Instant::now();
    let cfg = ckpt.config();
    let arch = match cfg.model_type.as_str() {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        other => {
            return Err(ExportError::Input(format!(
                "cannot export model_type `{other}` to GGUF"
            )));
        }
    };
    if let Some(rs) = &cfg.rope_scaling
        && rs.kind() != "default"
    {
        return Err(ExportError::Input(format!(
            "rope_scaling `{}` cannot be exported to GGUF here",
            rs.kind()
        )));
    }

    // Tensors and their types.
    let mut plan_rows = Vec::new();
    for (hf, shape) in ckpt.expected_tensors() {
        let g = hf_to_gguf_name(&hf)
            .ok_or_else(|| ExportError::Input(format!("no GGUF name for tensor `{hf}`")))?;
        debug_assert_eq!(gguf_to_hf_name(&g).as_deref(), Some(hf.as_str()));
        let planned = plan.planned_type(&g, &shape);
        let ty = plan.type_for(&g, &shape);
        plan_rows.push((hf, g, shape, planned, ty));
    }

    let mut warnings = Vec::new();
    let meta = metadata(ckpt, arch, plan, &mut warnings)?;
    let decls: Vec<TensorDecl> = plan_rows
        .iter()
        .map(|(_, g, s, _, ty)| TensorDecl {
            name: g.clone(),
            shape: s.clone(),
            ty: *ty,
        })
        .collect();
    let mut w = GgufWriter::create(out, &meta, decls)?;

    let total = plan_rows.len();
    let mut tensors = Vec::with_capacity(total);
    for (i, (hf, g, shape, planned, ty)) in plan_rows.into_iter().enumerate() {
        let Source {
            mut data,
            importance,
            mut encoded,
        } = source(&hf, &g, &shape)?;
        let n: usize = shape.iter().product();
        if data.len() != n && !(encoded.is_some() && data.is_empty()) {
            return Err(ExportError::Input(format!(
                "tensor `{hf}`: {} values for shape {shape:?}",
                data.len()
            )));
        }
        if arch == "llama" {
            let heads = if hf.contains("self_attn.q_proj") {
                Some(cfg.num_attention_heads)
            } else if hf.contains("self_attn.k_proj") {
                Some(cfg.num_kv_heads())
            } else {
                None
            };
            if let Some(h) = heads {
                let rows = shape[0];
                let cols = if shape.len() > 1 { shape[1] } else { 1 };
                if rows % h == 0 && (rows / h) % 2 == 0 {
                    if !data.is_empty() {
                        data = permute_rows(&data, rows, cols, h);
                    }
                    encoded = encoded.map(|e| {
                        let per_row = e.len() / rows.max(1);
                        permute_rows(&e, rows, per_row, h)
                    });
                }
            }
        }
        let row_len = *shape.last().unwrap_or(&1);
        let imp = if shape.len() >= 2 {
            importance.as_deref()
        } else {
            None
        };
        let bytes = match encoded {
            Some(e) => {
                let want = ty
                    .block_layout()
                    .filter(|(b, _)| n.is_multiple_of(*b))
                    .map(|(b, bytes)| n / b * bytes);
                if Some(e.len()) != want {
                    return Err(ExportError::Input(format!(
                        "tensor `{hf}`: {} encoded bytes, {want:?} for {n} values of {}",
                        e.len(),
                        ty.name()
                    )));
                }
                e
            }
            None => quantize(ty, &data, row_len, imp).map_err(|source| ExportError::Block {
                tensor: g.clone(),
                source,
            })?,
        };
        drop(data);
        w.write_tensor(&g, &bytes)?;
        progress(&Progress {
            index: i + 1,
            total,
            name: &g,
            ty,
        });
        tensors.push(ExportedTensor {
            name: g,
            shape,
            planned,
            ty,
            bytes: bytes.len(),
        });
    }
    let file_bytes = w.finish()?;
    Ok(ExportReport {
        tensors,
        file_bytes,
        warnings,
        seconds: start.elapsed().as_secs_f64(),
    })
}
