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
use model::gguf::writer::{GgufWriter, MetaArray, MetaValue, TensorDecl};
use model::gguf::{GgmlType, gguf_to_hf_name, permute_rows};
use serde_json::Value;

use crate::blocks::{BlockError, parse_type, quantize};

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

type Result<T> = std::result::Result<T, ExportError>;

/// One `PATTERN=TYPE` rule of a [`TypePlan`].
#[derive(Debug, Clone, PartialEq)]
pub struct TypeRule {
    /// Matched against GGUF tensor names, see [`pattern_matches`].
    pub pattern: String,
    /// The type for matching tensors.
    pub ty: GgmlType,
}

/// Which GGML type each tensor gets: the first matching rule, else the default. 1-D tensors
/// are always F32. A type whose block does not divide the row length falls back (see
/// [`fallback_type`]).
///
/// # Presets
///
/// `n` is the number of blocks; `more(i)` is llama.cpp's `use_more_bits`:
/// `i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`. "output" means `output.weight`, or
/// `token_embd.weight` when the embeddings are tied (no `output.weight`), as llama.cpp does.
///
/// | preset | default | output | `blk.i.attn_v.weight`, `blk.i.ffn_down.weight` | `general.file_type` |
/// |---|---|---|---|---|
/// | `f32`, `f16`, `bf16` | that type | same | same | 0, 1, 32 |
/// | `q8_0` | Q8_0 | Q8_0 | Q8_0 | 7 |
/// | `q4_0`, `q4_1`, `q5_0`, `q5_1` | that type | Q6_K | default | 2, 3, 8, 9 |
/// | `iq4_nl` | IQ4_NL | Q6_K | `attn_v` Q5_K when `gqa` >= 4, else default | 25 |
/// | `q3_k`, `q4_k`, `q5_k` | Q3_K, Q4_K, Q5_K | Q6_K | default | 11, 14, 16 (llama.cpp's `_S` ids) |
/// | `q6_k` | Q6_K | Q6_K | Q6_K | 18 |
/// | `q3_k_m` | Q3_K | Q6_K | `attn_v` Q5_K for i < 2, else Q4_K; `ffn_down` Q5_K for i < n/16, else Q4_K; `attn_output` Q4_K | 12 |
/// | `q4_k_m` | Q4_K | Q6_K | Q6_K where `more(i)`, else Q4_K | 15 |
/// | `q5_k_m` | Q5_K | Q6_K | Q6_K where `more(i)`, else Q5_K | 17 |
///
/// These follow llama.cpp's `llama_tensor_get_type` for those file types (its `q4_k`/`q5_k`
/// `_S` mixes also bump a few early layers to Q5_K; ours do not). With fallbacks, a model
/// whose hidden size is not a multiple of 256 (SmolLM2: 576) gets Q8_0 for the output in
/// every 3/4/5-bit preset, and Q5_0 (`q4_k*`) / Q5_1 (`q5_k*`) / IQ4_NL (`q3_k*`) for all
/// tensors whose rows are hidden-sized — exactly what llama-quantize writes for it.
#[derive(Debug, Clone, PartialEq)]
pub struct TypePlan {
    /// Preset name (or `custom`).
    pub name: String,
    /// Type of tensors no rule matches.
    pub default: GgmlType,
    /// Ordered rules; the first match wins.
    pub rules: Vec<TypeRule>,
    /// `general.file_type` (llama.cpp `llama_ftype`).
    pub file_type: u32,
}

/// The preset names [`TypePlan::preset`] accepts.
pub const PRESETS: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k",
    "q3_k_m", "q4_k_m", "q5_k_m", "iq4_nl",
];

/// llama.cpp's `use_more_bits(i, n)`.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Whether a rule pattern matches a GGUF tensor name. A pattern with `*` (any run of
/// characters) or `?` (one character) is a glob over the whole name; otherwise it matches when
/// it occurs in the name as whole dot-separated components: `ffn_down` matches
/// `blk.3.ffn_down.weight`, `blk.1` matches block 1 but not block 10, and `output.weight`
/// matches `output.weight` but not `blk.0.attn_output.weight`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern.contains(['*', '?']) {
        return glob(pattern.as_bytes(), name.as_bytes());
    }
    if pattern.is_empty() {
        return false;
    }
    let (nb, pl) = (name.as_bytes(), pattern.len());
    name.match_indices(pattern).any(|(start, _)| {
        let end = start + pl;
        (start == 0 || nb[start - 1] == b'.') && (end == nb.len() || nb[end] == b'.')
    })
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with single-star backtracking.
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The type llama.cpp falls back to when `ty`'s block does not divide `row_len`: Q3_K ->
/// IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and any 32-wide type -> F16; repeated
/// until it fits.
pub fn fallback_type(ty: GgmlType, row_len: usize) -> GgmlType {
    let mut t = ty;
    loop {
        let (blk, _) = t.block_layout().unwrap_or((1, 0));
        if row_len.is_multiple_of(blk) {
            return t;
        }
        t = match t {
            GgmlType::Q3_K => GgmlType::IQ4_NL,
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            _ => GgmlType::F16,
        };
    }
}

impl TypePlan {
    /// Every tensor in `ty` (1-D tensors still F32).
    pub fn uniform(ty: GgmlType) -> Self {
        Self {
            name: ty.name().to_lowercase(),
            default: ty,
            rules: Vec::new(),
            file_type: file_type_of(ty),
        }
    }

    /// [`Self::preset`] for the model `cfg` describes; `tied` when it has no separate
    /// `output.weight`.
    pub fn for_model(name: &str, cfg: &model::Config, tied: bool) -> Result<Self> {
        let gqa = cfg.num_attention_heads / cfg.num_kv_heads().max(1);
        Self::preset(name, cfg.num_hidden_layers, tied, gqa)
    }

    /// A named preset (see the table above) for a model with `n_layers` blocks; `tied` when
    /// there is no separate `output.weight`; `gqa` is attention heads per key/value head.
    pub fn preset(name: &str, n_layers: usize, tied: bool, gqa: usize) -> Result<Self> {
        let lname = name.to_ascii_lowercase();
        let unknown = || {
            ExportError::Input(format!(
                "unknown type `{name}` (valid: {})",
                PRESETS.join(", ")
            ))
        };
        if !PRESETS.contains(&lname.as_str()) {
            return Err(unknown());
        }
        let (base, mixed) = match lname.strip_suffix("_m") {
            Some(b) => (b, true),
            None => (lname.as_str(), false),
        };
        let ty = parse_type(base).ok_or_else(unknown)?;
        let mut plan = Self::uniform(ty);
        plan.name = lname.clone();
        let output = if tied {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let low_bit = matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::IQ4_NL
        );
        if low_bit {
            plan.rules.push(TypeRule {
                pattern: output.into(),
                ty: GgmlType::Q6_K,
            });
        }
        if ty == GgmlType::IQ4_NL && gqa >= 4 {
            plan.rules.push(TypeRule {
                pattern: "attn_v.weight".into(),
                ty: GgmlType::Q5_K,
            });
        }
        if mixed && ty == GgmlType::Q3_K {
            // llama.cpp's Q3_K_M: attn_v Q5_K in the first two blocks, ffn_down in the first
            // n/16, both Q4_K elsewhere; attn_output Q4_K.
            for i in 0..n_layers {
                let rule = |t: &str, ty| TypeRule {
                    pattern: format!("blk.{i}.{t}.weight"),
                    ty,
                };
                let wide = |more: bool| if more { GgmlType::Q5_K } else { GgmlType::Q4_K };
                plan.rules.push(rule("attn_v", wide(i < 2)));
                plan.rules.push(rule("ffn_down", wide(i < n_layers / 16)));
                plan.rules.push(rule("attn_output", GgmlType::Q4_K));
            }
            plan.file_type = 12;
        } else if mixed {
            for i in (0..n_layers).filter(|&i| use_more_bits(i, n_layers)) {
                for t in ["attn_v", "ffn_down"] {
                    plan.rules.push(TypeRule {
                        pattern: format!("blk.{i}.{t}.weight"),
                        ty: GgmlType::Q6_K,
                    });
                }
            }
            plan.file_type = if ty == GgmlType::Q4_K { 15 } else { 17 };
        }
        Ok(plan)
    }

    /// Adds a `PATTERN=TYPE` rule ahead of the existing ones (so user rules override a
    /// preset's).
    pub fn with_rule(mut self, spec: &str) -> Result<Self> {
        let (pat, ty) = spec
            .split_once('=')
            .ok_or_else(|| ExportError::Input(format!("rule `{spec}` is not PATTERN=TYPE")))?;
        let ty = parse_type(ty.trim()).ok_or_else(|| {
            ExportError::Input(format!(
                "rule `{spec}`: unknown type `{ty}` (valid: {})",
                type_names().join(", ")
            ))
        })?;
        let pattern = pat.trim().to_string();
        if pattern.is_empty() {
            return Err(ExportError::Input(format!(
                "rule `{spec}` has an empty pattern"
            )));
        }
        self.rules.insert(0, TypeRule { pattern, ty });
        self.name = format!("{}+rules", self.name.trim_end_matches("+rules"));
        Ok(self)
    }

    /// The planned type of a tensor before any fallback (`shape` row-major).
    pub fn planned_type(&self, gguf_name: &str, shape: &[usize]) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        self.rules
            .iter()
            .find(|r| pattern_matches(&r.pattern, gguf_name))
            .map(|r| r.ty)
            .unwrap_or(self.default)
    }

    /// The type actually written: the planned type, or its fallback when its block does not
    /// divide the row length.
    pub fn type_for(&self, gguf_name: &str, shape: &[usize]) -> GgmlType {
        fallback_type(
            self.planned_type(gguf_name, shape),
            *shape.last().unwrap_or(&1),
        )
    }
}

/// Lower-case names of the block types (`q4_k`, ...).
pub fn type_names() -> Vec<String> {
    crate::blocks::QUANTIZABLE
        .iter()
        .map(|t| t.name().to_lowercase())
        .collect()
}

/// llama.cpp's `llama_ftype` for a file mostly of `ty`.
pub fn file_type_of(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q3_K => 11,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        GgmlType::IQ4_NL => 25,
        GgmlType::Other(..) => 0,
    }
}

/// The GGUF name of an HF tensor name (inverse of [`model::gguf::gguf_to_hf_name`]).
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}.{suffix}"))
}

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

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

/// All metadata in llama.cpp's converter order.
fn metadata(
    ckpt: &Checkpoint,
    arch: &str,
    plan: &TypePlan,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, MetaValue)>> {
    let cfg = ckpt.config();
    let teacher = match ckpt.gguf() {
        Some(g) => model::gguf::writer::read_metadata(g.path())?,
        None => Vec::new(),
    };
    let teacher_str = |k: &str| {
        teacher
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.as_str().map(str::to_string))
    };
    let name = teacher_str("general.name").unwrap_or_else(|| {
        ckpt.path()
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into())
    });
    let u32v = |v: usize| MetaValue::U32(v as u32);
    let mut m = vec![
        kv("general.architecture", MetaValue::str(arch)),
        kv("general.type", MetaValue::str("model")),
        kv("general.name", MetaValue::Str(name)),
    ];
    // Other descriptive general.* keys of a GGUF source (organization, license, ...).
    const OURS: &[&str] = &[
        "general.architecture",
        "general.type",
        "general.name",
        "general.file_type",
        "general.alignment",
        "general.quantization_version",
    ];
    for (k, v) in &teacher {
        if k.starts_with("general.") && !OURS.contains(&k.as_str()) {
            m.push((k.clone(), v.clone()));
        }
    }
    let a = |k: &str| format!("{arch}.{k}");
    m.push((a("block_count"), u32v(cfg.num_hidden_layers)));
    m.push((a("context_length"), u32v(cfg.max_position_embeddings)));
    m.push((a("embedding_length"), u32v(cfg.hidden_size)));
    m.push((a("feed_forward_length"), u32v(cfg.intermediate_size)));
    m.push((a("attention.head_count"), u32v(cfg.num_attention_heads)));
    m.push((a("attention.head_count_kv"), u32v(cfg.num_kv_heads())));
    m.push((a("rope.freq_base"), MetaValue::F32(cfg.rope_theta as f32)));
    m.push((
        a("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_norm_eps as f32),
    ));
    if cfg.hidden_size != cfg.num_attention_heads * cfg.head_dim() {
        m.push((a("attention.key_length"), u32v(cfg.head_dim())));
        m.push((a("attention.value_length"), u32v(cfg.head_dim())));
    }
    m.push(kv("general.file_type", MetaValue::U32(plan.file_type)));
    m.push((a("vocab_size"), u32v(cfg.vocab_size)));
    m.push((a("rope.dimension_count"), u32v(cfg.head_dim())));
    m.push(kv("general.alignment", MetaValue::U32(32)));
    if ckpt.gguf().is_some() {
        let before = m.len();
        m.extend(
            teacher
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .cloned(),
        );
        if m.len() == before {
            return Err(ExportError::Input(format!(
                "{}: no tokenizer.* metadata to copy",
                ckpt.path().display()
            )));
        }
    } else {
        m.extend(hf_tokenizer_metadata(ckpt, warnings)?);
    }
    m.push(kv("general.quantization_version", MetaValue::U32(2)));
    Ok(m)
}

/// llama.cpp token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` for an HF `pre_tokenizer` (see the module docs), `None` if unknown.
pub fn detect_pre(pre: &Value) -> Option<&'static str> {
    let ty = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let parts: Vec<&Value> = match ty(pre).as_str() {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        "" => return None,
        _ => vec![pre],
    };
    let kinds: Vec<String> = parts.iter().map(|p| ty(p)).collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    match kinds.as_slice() {
        ["ByteLevel"] => Some("gpt-2"),
        ["Digits", "ByteLevel"]
            if parts[0].get("individual_digits") == Some(&Value::Bool(true)) =>
        {
            Some("smollm")
        }
        ["Split", "ByteLevel"] => {
            let re = parts[0].get("pattern")?.get("Regex")?.as_str()?;
            if re == LLAMA3_SPLIT {
                Some("llama-bpe")
            } else if re == QWEN2_SPLIT {
                Some("qwen2")
            } else {
                None
            }
        }
        _ => None,
    }
}

fn hf_tokenizer_metadata(
    ckpt: &Checkpoint,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, MetaValue)>> {
    let dir = ckpt.path();
    let tpath = dir.join("tokenizer.json");
    let read_json = |p: &Path| -> Result<Value> {
        let text = model::io::read_side_file(p)?;
        serde_json::from_str(&text).map_err(|e| ExportError::Input(format!("{}: {e}", p.display())))
    };
    let tj = read_json(&tpath)?;
    let bad = |m: String| ExportError::Input(format!("{}: {m}", tpath.display()));
    let mdl = tj.get("model").ok_or_else(|| bad("no `model`".into()))?;
    if mdl.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(bad("only byte-level BPE tokenizers can be exported from an HF folder (export from a GGUF source instead)".into()));
    }
    if mdl.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(bad("SentencePiece-style BPE (byte_fallback) cannot be exported from an HF folder yet (export from a GGUF source instead)".into()));
    }
    let vocab = mdl
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no model.vocab".into()))?;
    let cfg = ckpt.config();
    let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size];
    let mut types = vec![TOKEN_NORMAL; cfg.vocab_size];
    let mut put = |id: u64, tok: &str, ty: i32| -> Result<()> {
        let i = id as usize;
        if i >= tokens.len() {
            return Err(bad(format!(
                "token id {id} is not below vocab_size {}",
                cfg.vocab_size
            )));
        }
        tokens[i] = Some(tok.to_string());
        types[i] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        put(
            id.as_u64()
                .ok_or_else(|| bad(format!("bad id for `{tok}`")))?,
            tok,
            TOKEN_NORMAL,
        )?;
    }
    for a in tj
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Value::as_u64),
            a.get("content").and_then(Value::as_str),
        ) else {
            continue;
        };
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        put(
            id,
            content,
            if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            },
        )?;
    }
    let mut token_strs = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            Some(t) => token_strs.push(t),
            None => {
                token_strs.push(format!("[PAD{i}]"));
                types[i] = TOKEN_UNUSED;
            }
        }
    }
    let merges: Vec<String> = mdl
        .get("merges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => Err(bad(format!("unreadable merge {other}"))),
        })
        .collect::<Result<_>>()?;
    let pre = match tj.get("pre_tokenizer").and_then(detect_pre) {
        Some(p) => p,
        None => {
            warnings.push(format!(
                "{}: pre-tokenizer not recognised; wrote tokenizer.ggml.pre = \"default\" (plain GPT-2 splitting), \
                 which may tokenize differently from the original",
                tpath.display()
            ));
            "default"
        }
    };
    let tc = dir.join("tokenizer_config.json");
    let tcj = if tc.exists() {
        read_json(&tc)?
    } else {
        Value::Null
    };
    let add_bos = match tcj.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        None => model::load_tokenizer(ckpt)?.add_bos,
    };
    let mut m = vec![
        kv("tokenizer.ggml.model", MetaValue::str("gpt2")),
        kv("tokenizer.ggml.pre", MetaValue::str(pre)),
        kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::Str(token_strs)),
        ),
        kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(types)),
        ),
        kv(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::Str(merges)),
        ),
    ];
    if let Some(b) = cfg.bos_token_id.as_ref().and_then(|b| b.first()) {
        m.push(kv("tokenizer.ggml.bos_token_id", MetaValue::U32(b)));
    }
    if let Some(e) = cfg.eos_token_id.as_ref().and_then(|b| b.first()) {
        m.push(kv("tokenizer.ggml.eos_token_id", MetaValue::U32(e)));
    }
    // unk/pad: the model's unk_token, else tokenizer_config.json's `unk_token`/`pad_token`
    // (a string or {"content": ...}), looked up in the vocabulary and the added tokens.
    let id_of = |tok: &str| -> Option<u32> {
        vocab
            .get(tok)
            .and_then(Value::as_u64)
            .map(|v| v as u32)
            .or_else(|| {
                tj.get("added_tokens")?
                    .as_array()?
                    .iter()
                    .find(|a| a.get("content").and_then(Value::as_str) == Some(tok))?
                    .get("id")?
                    .as_u64()
                    .map(|v| v as u32)
            })
    };
    let config_tok = |key: &str| -> Option<String> {
        match tcj.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    };
    let unk = mdl
        .get("unk_token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| config_tok("unk_token"));
    if let Some(u) = unk.as_deref().and_then(id_of) {
        m.push(kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(u)));
    }
    if let Some(p) = config_tok("pad_token").as_deref().and_then(id_of) {
        m.push(kv("tokenizer.ggml.padding_token_id", MetaValue::U32(p)));
    }
    m.push(kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(add_bos)));
    let template = match tcj.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: take `default`.
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    };
    if let Some(t) = template {
        m.push(kv("tokenizer.chat_template", MetaValue::Str(t)));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("ffn_down", "blk.3.ffn_down.weight"));
        assert!(pattern_matches("blk.1", "blk.1.attn_q.weight"));
        assert!(!pattern_matches("blk.1", "blk.10.attn_q.weight"));
        assert!(pattern_matches("output.weight", "output.weight"));
        assert!(!pattern_matches(
            "output.weight",
            "blk.0.attn_output.weight"
        ));
        assert!(pattern_matches(
            "blk.*.attn_?.weight",
            "blk.12.attn_v.weight"
        ));
        assert!(!pattern_matches(
            "blk.*.attn_?.weight",
            "blk.12.attn_output.weight"
        ));
        assert!(pattern_matches("*", "token_embd.weight"));
        assert!(!pattern_matches("", "x"));
    }

    #[test]
    fn more_bits_matches_llama_cpp() {
        // 32 layers: 0..4, 28..32, and every third from 4 (6, 9, ...).
        let got: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn presets_and_fallbacks() {
        let p = TypePlan::preset("q4_k_m", 30, true, 1).unwrap();
        assert_eq!(p.file_type, 15);
        assert_eq!(
            p.type_for("token_embd.weight", &[49152, 576]),
            GgmlType::Q8_0
        );
        assert_eq!(
            p.planned_type("token_embd.weight", &[49152, 576]),
            GgmlType::Q6_K
        );
        assert_eq!(
            p.type_for("blk.0.ffn_down.weight", &[576, 1536]),
            GgmlType::Q6_K
        );
        assert_eq!(
            p.type_for("blk.4.ffn_down.weight", &[576, 1536]),
            GgmlType::Q4_K
        );
        assert_eq!(
            p.type_for("blk.4.attn_q.weight", &[576, 576]),
            GgmlType::Q5_0
        );
        assert_eq!(
            p.type_for("blk.0.attn_v.weight", &[192, 576]),
            GgmlType::Q8_0
        );
        assert_eq!(p.type_for("blk.0.attn_norm.weight", &[576]), GgmlType::F32);
        let q = TypePlan::preset("Q4_0", 30, false, 1).unwrap();
        assert_eq!(q.type_for("output.weight", &[32000, 4096]), GgmlType::Q6_K);
        assert_eq!(
            q.type_for("token_embd.weight", &[32000, 4096]),
            GgmlType::Q4_0
        );
        assert_eq!(
            q.type_for("blk.0.attn_output.weight", &[4096, 4096]),
            GgmlType::Q4_0
        );
        let r = q.with_rule("ffn_down=q8_0").unwrap();
        assert_eq!(
            r.type_for("blk.2.ffn_down.weight", &[4096, 11008]),
            GgmlType::Q8_0
        );
        assert!(TypePlan::preset("q2_k", 30, false, 1).is_err());
        // q3_k_m on SmolLM2's shapes: Q3_K rows of 576 fall back to IQ4_NL, Q4_K to Q5_0,
        // Q5_K to Q5_1, the output Q6_K to Q8_0; the 1536-wide ffn_down keeps its K types.
        let m = TypePlan::preset("q3_k_m", 30, true, 3).unwrap();
        assert_eq!(m.file_type, 12);
        for (name, shape, ty) in [
            ("blk.3.attn_q.weight", [576, 576], GgmlType::IQ4_NL),
            ("blk.3.ffn_up.weight", [1536, 576], GgmlType::IQ4_NL),
            ("blk.1.attn_v.weight", [192, 576], GgmlType::Q5_1),
            ("blk.2.attn_v.weight", [192, 576], GgmlType::Q5_0),
            ("blk.7.attn_output.weight", [576, 576], GgmlType::Q5_0),
            ("blk.0.ffn_down.weight", [576, 1536], GgmlType::Q5_K),
            ("blk.1.ffn_down.weight", [576, 1536], GgmlType::Q4_K),
            ("token_embd.weight", [49152, 576], GgmlType::Q8_0),
        ] {
            assert_eq!(m.type_for(name, &shape), ty, "{name}");
        }
        // On 4096-wide rows the planned types stand.
        assert_eq!(
            m.type_for("blk.3.attn_q.weight", &[4096, 4096]),
            GgmlType::Q3_K
        );
        assert_eq!(
            m.type_for("blk.5.attn_v.weight", &[1024, 4096]),
            GgmlType::Q4_K
        );
        // iq4_nl: llama.cpp's mix (output Q6_K; attn_v Q5_K only with 4+ heads per kv head).
        let n = TypePlan::preset("iq4_nl", 30, true, 3).unwrap();
        assert_eq!(n.file_type, 25);
        assert_eq!(
            n.type_for("blk.1.attn_v.weight", &[192, 576]),
            GgmlType::IQ4_NL
        );
        assert_eq!(
            n.type_for("token_embd.weight", &[49152, 576]),
            GgmlType::Q8_0
        );
        let g = TypePlan::preset("iq4_nl", 32, false, 4).unwrap();
        assert_eq!(
            g.type_for("blk.1.attn_v.weight", &[1024, 4096]),
            GgmlType::Q5_K
        );
        assert_eq!(
            g.type_for("blk.1.attn_k.weight", &[1024, 4096]),
            GgmlType::IQ4_NL
        );
        assert_eq!(g.type_for("output.weight", &[32000, 4096]), GgmlType::Q6_K);
        assert!(TypePlan::uniform(GgmlType::F16).with_rule("x=q9").is_err());
        assert_eq!(fallback_type(GgmlType::Q4_0, 48), GgmlType::F16);
        assert_eq!(fallback_type(GgmlType::Q5_K, 576), GgmlType::Q5_1);
    }

    #[test]
    fn names_invert_the_reader() {
        for l in [0, 17] {
            for part in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.q_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                let hf = format!("model.layers.{l}.{part}");
                assert_eq!(gguf_to_hf_name(&hf_to_gguf_name(&hf).unwrap()).unwrap(), hf);
            }
        }
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert_eq!(gguf_to_hf_name(&hf_to_gguf_name(hf).unwrap()).unwrap(), hf);
        }
        assert!(hf_to_gguf_name("model.rotary.inv_freq").is_none());
    }

    #[test]
    fn pre_tokenizer_detection() {
        let smol = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, {"type": "ByteLevel"}]});
        assert_eq!(detect_pre(&smol), Some("smollm"));
        assert_eq!(
            detect_pre(&serde_json::json!({"type": "ByteLevel"})),
            Some("gpt-2")
        );
        let l3 = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}}, {"type": "ByteLevel"}]});
        assert_eq!(detect_pre(&l3), Some("llama-bpe"));
        assert_eq!(detect_pre(&serde_json::json!({"type": "Whitespace"})), None);
    }
}
