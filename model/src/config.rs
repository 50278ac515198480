//! `Config` mirrors Hugging Face `config.json` for the Llama family (Llama 2/3, Mistral,
//! Qwen2, SmolLM2, TinyLlama) field for field, so a checkpoint's config loads without a
//! translation table. Variants are flags (`attention_bias`, `tie_word_embeddings`, ...).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The model families this crate can run; all share the Llama block layout.
pub const KNOWN_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// Token ids may be one id or a list in HF configs (Llama 3 lists several EOS ids).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

/// HF `rope_scaling`; only the `llama3` kind changes the frequencies here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (newer configs) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// ... or `type` (older configs).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Scaling factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// llama3: low-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// llama3: high-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// llama3: the original context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeScaling {
    /// The scaling kind, whichever key named it.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.kind.as_deref())
            .unwrap_or("default")
    }
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    2048
}

/// A decoder-only transformer's configuration, as in HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); equals the query heads when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Context length the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Epsilon of RMSNorm.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (llama3 kind supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o (Llama's flag; Qwen2 always has q/k/v bias).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral/Qwen2 sliding window (recorded; windows here are shorter than it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Storage dtype named by the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

impl Config {
    /// Parses and validates `config.json` text; `path` names the file in errors. RoPE
    /// settings are read from either layout (see [`Config::from_json_str_with_origin`]).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        Self::from_json_str_with_origin(text, path).map(|(c, _)| c)
    }

    /// As [`Config::from_json_str`], also saying where the RoPE settings came from.
    ///
    /// transformers 4 writes a top-level `rope_theta` and `rope_scaling`; transformers 5
    /// (and llm-compressor, which saves through it) writes one `rope_parameters` object
    /// holding `rope_theta`, `rope_type` and the scaling fields. Both are read; a file with
    /// both must agree on every value both give. The result always holds the old layout
    /// (`rope_theta`, `rope_scaling`), which both versions of transformers read back.
    pub fn from_json_str_with_origin(text: &str, path: &Path) -> Result<(Self, RopeOrigin)> {
        // Check the family before the fields, so an unknown model gets the clearer message.
        let mut raw: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            let msg = match bare_non_finite(text) {
                Some((key, tok)) => format!(
                    "invalid JSON: `{key}` is {tok}, which JSON cannot hold (write a finite number)"
                ),
                None => format!("invalid JSON: {e}"),
            };
            ModelError::config(path, msg)
        })?;
        let model_type = match raw.get("model_type").and_then(|v| v.as_str()) {
            None => return Err(ModelError::config(path, "missing key `model_type`")),
            Some(t) if !KNOWN_MODEL_TYPES.contains(&t) => {
                return Err(ModelError::config(
                    path,
                    format!(
                        "unknown model_type `{t}` (known: {})",
                        KNOWN_MODEL_TYPES.join(", ")
                    ),
                ));
            }
            Some(t) => t.to_string(),
        };
        let origin = match raw.as_object_mut() {
            Some(map) => {
                // transformers 5 names the storage dtype `dtype`; older files `torch_dtype`.
                match (map.get("torch_dtype"), map.get("dtype")) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(ModelError::config(
                            path,
                            format!("`torch_dtype` = {a} conflicts with `dtype` = {b}"),
                        ));
                    }
                    (None, Some(d)) => {
                        let d = d.clone();
                        map.insert("torch_dtype".into(), d);
                    }
                    _ => {}
                }
                resolve_rope(map, &model_type).map_err(|m| ModelError::config(path, m))?
            }
            None => return Err(ModelError::config(path, "the top level is not an object")),
        };
        let cfg: Config =
            serde_json::from_value(raw).map_err(|e| ModelError::config(path, e.to_string()))?;
        cfg.validate(path)?;
        Ok((cfg, origin))
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with_origin(path).map(|(c, _)| c)
    }

    /// As [`Config::from_file`], also saying where the RoPE settings came from (`inspect`
    /// reports [`RopeOrigin::theta_defaulted`]).
    pub fn from_file_with_origin(path: &Path) -> Result<(Self, RopeOrigin)> {
        let text = crate::io::read_text(path, crate::io::CONFIG_LIMIT)?;
        Self::from_json_str_with_origin(&text, path)
    }

    /// Checks the numbers agree with each other and are of sane size.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(ModelError::config(path, m));
        if !KNOWN_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return err(format!(
                "unknown model_type `{}` (known: {})",
                self.model_type,
                KNOWN_MODEL_TYPES.join(", ")
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            // 2^24 bounds every dimension of any released model and keeps products in range.
            if v == 0 || v > 1 << 24 {
                return err(format!("`{name}` = {v} is out of range"));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) || hd > 1024 {
            return err(format!(
                "head_dim {hd} must be even, non-zero and at most 1024"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_act != "silu" {
            return err(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return err(format!(
                "rms_norm_eps {} is out of range",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return err(format!("rope_theta {} is out of range", self.rope_theta));
        }
        if let Some(rs) = &self.rope_scaling {
            match rs.kind() {
                "default" => {}
                "llama3" => check_llama3(
                    "rope_scaling",
                    rs.factor,
                    rs.low_freq_factor,
                    rs.high_freq_factor,
                    rs.original_max_position_embeddings.map(|v| v as f64),
                )
                .or_else(err)?,
                other => return err(format!("rope_scaling type `{other}` is not supported")),
            }
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// Parameters implied by the config (weights and biases, lm_head counted once if tied),
    /// `u64::MAX` if more: `validate` bounds each dimension by 2^24, not their product, and
    /// 2^24 layers of 2^24-wide blocks overflow u64 (found with the `config_json` fuzz target).
    pub fn num_params(&self) -> u64 {
        // u128: every factor is below 2^34 after `validate`, so no term overflows.
        let (h, i, v) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.vocab_size as u128,
        );
        let (q, kv) = (
            (self.num_attention_heads as u128) * self.head_dim() as u128,
            (self.num_kv_heads() as u128) * self.head_dim() as u128,
        );
        let mut block = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias() {
            block += q + 2 * kv;
        }
        if self.o_bias() {
            block += h;
        }
        if self.mlp_bias {
            block += 2 * i + h;
        }
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        let total = v * h + self.num_hidden_layers as u128 * block + h + head;
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    /// RoPE inverse frequencies (length head_dim/2), llama3 scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let mut inv: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        if let Some(rs) = &self.rope_scaling
            && rs.kind() == "llama3"
        {
            // HF `_compute_llama3_parameters`: keep high frequencies, divide low ones by
            // `factor`, and interpolate smoothly between the two wavelength bands.
            let factor = rs.factor.unwrap_or(1.0);
            let lo = rs.low_freq_factor.unwrap_or(1.0);
            let hi = rs.high_freq_factor.unwrap_or(4.0);
            let old = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
            let lo_wavelen = old / lo;
            let hi_wavelen = old / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > lo_wavelen {
                    *f /= factor;
                } else if wavelen >= hi_wavelen {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        inv
    }
}

/// Where a config's RoPE settings came from, as [`Config::from_json_str_with_origin`]
/// found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RopeOrigin {
    /// No `rope_theta` anywhere in the file: the HF class default (10000) was used.
    pub theta_defaulted: bool,
    /// The file has `rope_parameters` (transformers 5 layout).
    pub nested: bool,
    /// The file has a top-level `rope_theta` or `rope_scaling` (transformers 4 layout).
    pub flat: bool,
}

/// The RoPE types the transformer implements.
const ROPE_TYPES: &[&str] = &["default", "llama3"];

/// RoPE types transformers knows that the transformer here does not implement.
const ROPE_TYPES_UNIMPLEMENTED: &[&str] = &[
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "proportional",
    "su",
    "mrope",
];

/// Keys transformers reads inside `rope_parameters` / `rope_scaling` (`RopeParameters`).
const ROPE_KEYS: &[&str] = &[
    "rope_theta",
    "rope_type",
    "type",
    "partial_rotary_factor",
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "short_factor",
    "long_factor",
    "low_freq_factor",
    "high_freq_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
];

/// Other families' names for the RoPE base: never silently replaced by a default.
const OTHER_THETA_KEYS: &[&str] = &[
    "rotary_emb_base",
    "rope_base",
    "rotary_base",
    "rope_freq_base",
];

/// `rope_theta` of HF's config class when the file has none (`default_theta`).
fn hf_default_rope_theta(model_type: &str) -> Option<f64> {
    match model_type {
        "llama" | "mistral" | "qwen2" => Some(10_000.0),
        _ => None,
    }
}

/// One RoPE dict (`rope_parameters` or `rope_scaling`) as read.
#[derive(Default)]
struct RopeDict {
    theta: Option<f64>,
    /// The type and the key that named it.
    kind: Option<(String, &'static str)>,
    factor: Option<f64>,
    low: Option<f64>,
    high: Option<f64>,
    omp: Option<f64>,
}

/// A JSON number, `null` (absent) or transformers 5's `{"__float__": "NaN"}` tag.
fn json_number(v: &serde_json::Value, key: &str) -> std::result::Result<Option<f64>, String> {
    use serde_json::Value;
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_f64()),
        Value::Object(m) if m.len() == 1 => match m.get("__float__").and_then(|t| t.as_str()) {
            Some("NaN") => Ok(Some(f64::NAN)),
            Some("Infinity") => Ok(Some(f64::INFINITY)),
            Some("-Infinity") => Ok(Some(f64::NEG_INFINITY)),
            _ => Err(format!("`{key}` must be a number, found {v}")),
        },
        _ => Err(format!("`{key}` must be a number, found {v}")),
    }
}

fn check_theta(key: &str, t: f64) -> std::result::Result<(), String> {
    if t.is_finite() && t > 1.0 {
        Ok(())
    } else {
        Err(format!(
            "`{key}` = {t} is out of range (must be finite and > 1)"
        ))
    }
}

/// The llama3 fields, each present and in the range HF's validation accepts.
fn check_llama3(
    prefix: &str,
    factor: Option<f64>,
    low: Option<f64>,
    high: Option<f64>,
    omp: Option<f64>,
) -> std::result::Result<(), String> {
    let need = |name: &str, v: Option<f64>| {
        v.ok_or_else(|| {
            format!(
                "`{prefix}.{name}` is missing (llama3 needs factor, low_freq_factor, \
                 high_freq_factor and original_max_position_embeddings)"
            )
        })
    };
    let (f, lo, hi, o) = (
        need("factor", factor)?,
        need("low_freq_factor", low)?,
        need("high_freq_factor", high)?,
        need("original_max_position_embeddings", omp)?,
    );
    if !(f.is_finite() && f >= 1.0) {
        return Err(format!("`{prefix}.factor` = {f} must be finite and >= 1"));
    }
    if !(lo.is_finite() && lo > 0.0) {
        return Err(format!(
            "`{prefix}.low_freq_factor` = {lo} must be finite and > 0"
        ));
    }
    if !(hi.is_finite() && hi > lo) {
        return Err(format!(
            "`{prefix}.high_freq_factor` = {hi} must be finite and above low_freq_factor {lo}"
        ));
    }
    if !(o.is_finite() && o >= 1.0) {
        return Err(format!(
            "`{prefix}.original_max_position_embeddings` = {o} must be a positive integer"
        ));
    }
    Ok(())
}

/// Reads one RoPE dict; `prefix` is its key, for messages.
fn rope_dict(
    prefix: &str,
    m: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<RopeDict, String> {
    let mut d = RopeDict::default();
    for (k, v) in m {
        let key = format!("{prefix}.{k}");
        if !ROPE_KEYS.contains(&k.as_str()) {
            return Err(format!("unknown key `{key}`"));
        }
        match k.as_str() {
            "rope_theta" => {
                d.theta = json_number(v, &key)?;
                if let Some(t) = d.theta {
                    check_theta(&key, t)?;
                }
            }
            "rope_type" | "type" => {
                let Some(t) = v.as_str() else {
                    return Err(format!("`{key}` must be a string, found {v}"));
                };
                let name: &'static str = if k == "type" { "type" } else { "rope_type" };
                if let Some((prev, prev_key)) = &d.kind
                    && prev != t
                {
                    return Err(format!(
                        "`{prefix}.{prev_key}` = `{prev}` conflicts with `{key}` = `{t}`"
                    ));
                }
                if !ROPE_TYPES.contains(&t) {
                    let why = if ROPE_TYPES_UNIMPLEMENTED.contains(&t) {
                        "is not implemented here"
                    } else {
                        "is unknown"
                    };
                    return Err(format!(
                        "`{key}` = `{t}` {why} (supported: {})",
                        ROPE_TYPES.join(", ")
                    ));
                }
                d.kind = Some((t.to_string(), name));
            }
            "partial_rotary_factor" => {
                if let Some(p) = json_number(v, &key)?
                    && p != 1.0
                {
                    return Err(format!("`{key}` = {p} is not supported (only 1.0)"));
                }
            }
            "factor" => d.factor = json_number(v, &key)?,
            "low_freq_factor" => d.low = json_number(v, &key)?,
            "high_freq_factor" => d.high = json_number(v, &key)?,
            "original_max_position_embeddings" => d.omp = json_number(v, &key)?,
            // Fields of the types refused above; `default` and `llama3` ignore them, as HF does.
            _ => {}
        }
    }
    Ok(d)
}

/// The `rope_parameters` object: one dict, or one per layer type (which must all agree).
fn nested_dict(
    v: &serde_json::Value,
) -> std::result::Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    use serde_json::Value;
    let m = match v {
        Value::Null => return Ok(None),
        Value::Object(m) => m,
        _ => return Err(format!("`rope_parameters` must be an object, found {v}")),
    };
    let per_layer = !m.is_empty() && m.values().all(|x| x.is_object());
    if !per_layer {
        return Ok(Some(m.clone()));
    }
    let mut it = m.iter();
    let (first_key, first) = it.next().expect("not empty");
    for (k, x) in it {
        if x != first {
            return Err(format!(
                "`rope_parameters.{k}` differs from `rope_parameters.{first_key}`: RoPE that \
                 differs per layer type is not supported"
            ));
        }
    }
    Ok(first.as_object().cloned())
}

/// Reads RoPE settings from either layout and rewrites them into `map` as the old layout
/// (`rope_theta`, `rope_scaling`), so the struct's fields hold what the file means.
fn resolve_rope(
    map: &mut serde_json::Map<String, serde_json::Value>,
    model_type: &str,
) -> std::result::Result<RopeOrigin, String> {
    use serde_json::{Value, json};
    for k in OTHER_THETA_KEYS {
        if map.contains_key(*k) {
            return Err(format!(
                "`{k}` is not read for model_type `{model_type}`; its RoPE base is `rope_theta`"
            ));
        }
    }
    if let Some(v) = map.get("partial_rotary_factor")
        && let Some(p) = json_number(v, "partial_rotary_factor")?
        && p != 1.0
    {
        return Err(format!(
            "`partial_rotary_factor` = {p} is not supported (only 1.0)"
        ));
    }
    let top_theta = match map.get("rope_theta") {
        Some(v) => json_number(v, "rope_theta")?,
        None => None,
    };
    if let Some(t) = top_theta {
        check_theta("rope_theta", t)?;
    }
    let flat = match map.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(rope_dict("rope_scaling", m)?),
        Some(v) => return Err(format!("`rope_scaling` must be an object, found {v}")),
    };
    let nested = match map.get("rope_parameters") {
        Some(v) => match nested_dict(v)? {
            Some(m) => Some(rope_dict("rope_parameters", &m)?),
            None => None,
        },
        None => None,
    };
    let origin = RopeOrigin {
        theta_defaulted: false,
        nested: nested.is_some(),
        flat: top_theta.is_some() || flat.is_some(),
    };

    // Every theta the file gives must agree.
    let thetas = [
        ("rope_theta", top_theta),
        (
            "rope_scaling.rope_theta",
            flat.as_ref().and_then(|d| d.theta),
        ),
        (
            "rope_parameters.rope_theta",
            nested.as_ref().and_then(|d| d.theta),
        ),
    ];
    let mut theta: Option<(&str, f64)> = None;
    for (key, t) in thetas {
        let Some(t) = t else { continue };
        match theta {
            Some((k0, t0)) if t0 != t => {
                return Err(format!("`{k0}` = {t0} conflicts with `{key}` = {t}"));
            }
            Some(_) => {}
            None => theta = Some((key, t)),
        }
    }
    let mut origin = origin;
    let theta = match theta {
        Some((_, t)) => t,
        None if nested.is_some() => {
            return Err(
                "`rope_parameters` has no `rope_theta` and there is no top-level \
                        `rope_theta`"
                    .into(),
            );
        }
        None => {
            origin.theta_defaulted = true;
            hf_default_rope_theta(model_type).ok_or_else(|| {
                format!("missing key `rope_theta` (no HF default for model_type `{model_type}`)")
            })?
        }
    };

    // Scaling: the two dicts must agree on every field both give.
    let kind_of = |d: &RopeDict| {
        d.kind
            .as_ref()
            .map_or("default".to_string(), |(k, _)| k.clone())
    };
    let (kind, prefix) = match (&flat, &nested) {
        (Some(f), Some(n)) => {
            let (kf, kn) = (kind_of(f), kind_of(n));
            if kf != kn {
                return Err(format!(
                    "`rope_scaling.rope_type` = `{kf}` conflicts with \
                     `rope_parameters.rope_type` = `{kn}`"
                ));
            }
            for (name, a, b) in [
                ("factor", f.factor, n.factor),
                ("low_freq_factor", f.low, n.low),
                ("high_freq_factor", f.high, n.high),
                ("original_max_position_embeddings", f.omp, n.omp),
            ] {
                if let (Some(a), Some(b)) = (a, b)
                    && a != b
                {
                    return Err(format!(
                        "`rope_scaling.{name}` = {a} conflicts with `rope_parameters.{name}` = {b}"
                    ));
                }
            }
            (kn, "rope_parameters")
        }
        (None, Some(n)) => (kind_of(n), "rope_parameters"),
        (Some(f), None) => (kind_of(f), "rope_scaling"),
        (None, None) => ("default".to_string(), ""),
    };
    let pick = |get: fn(&RopeDict) -> Option<f64>| {
        nested
            .as_ref()
            .and_then(get)
            .or_else(|| flat.as_ref().and_then(get))
    };
    let (factor, low, high, omp) = (
        pick(|d| d.factor),
        pick(|d| d.low),
        pick(|d| d.high),
        pick(|d| d.omp),
    );

    map.remove("rope_parameters");
    map.insert("rope_theta".into(), json!(theta));
    if kind == "llama3" {
        // transformers 5 prefers a top-level `original_max_position_embeddings` (Phi-3
        // style) to the dict's; transformers 4 reads only the dict's. They must agree.
        let top = match map.get("original_max_position_embeddings") {
            Some(v) => json_number(v, "original_max_position_embeddings")?,
            None => None,
        };
        let omp = match (omp, top) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "`{prefix}.original_max_position_embeddings` = {a} conflicts with \
                     `original_max_position_embeddings` = {b}"
                ));
            }
            (a, b) => a.or(b),
        };
        check_llama3(prefix, factor, low, high, omp)?;
        let omp = omp.expect("checked");
        if omp.fract() != 0.0 || omp > usize::MAX as f64 {
            return Err(format!(
                "`{prefix}.original_max_position_embeddings` = {omp} must be a positive integer"
            ));
        }
        map.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": omp as usize}),
        );
    } else {
        // `default`: HF ignores any scaling fields.
        map.remove("rope_scaling");
    }
    Ok(origin)
}

/// The first bare `NaN` / `Infinity` token of JSON text (Python's `json.dumps` writes them)
/// and the dotted key it is the value of, so the parse error can name the key.
fn bare_non_finite(text: &str) -> Option<(String, &'static str)> {
    let b = text.as_bytes();
    // One entry per open object or array: the key being read in it.
    let mut stack: Vec<Option<String>> = Vec::new();
    let mut last_string = String::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                last_string = text.get(start..i.min(b.len()))?.to_string();
            }
            b'{' | b'[' => stack.push(None),
            b'}' | b']' => {
                stack.pop();
            }
            b':' => {
                if let Some(top) = stack.last_mut() {
                    *top = Some(last_string.clone());
                }
            }
            _ => {
                for tok in ["NaN", "-Infinity", "Infinity"] {
                    if b[i..].starts_with(tok.as_bytes()) {
                        let key: Vec<&str> = stack.iter().flatten().map(|s| s.as_str()).collect();
                        return Some((key.join("."), tok));
                    }
                }
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("config.json")
    }

    #[test]
    fn smollm2_config_parses() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
          "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
          "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,
          "bos_token_id":1,"eos_token_id":2,"max_position_embeddings":8192}"#;
        let c = Config::from_json_str(text, p()).unwrap();
        assert_eq!(c.head_dim(), 64);
        assert_eq!(c.num_kv_heads(), 3);
        assert!(!c.qkv_bias());
        // SmolLM2-135M has 134,515,008 parameters.
        assert_eq!(c.num_params(), 134_515_008);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama3_eos_list_parses() {
        let text = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,"intermediate_size":128,
          "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"eos_token_id":[1,2]}"#;
        let c = Config::from_json_str(text, p()).unwrap();
        assert!(c.qkv_bias() && !c.o_bias());
        assert_eq!(c.eos_token_id.unwrap().first(), Some(1));
    }

    #[test]
    fn unknown_model_type_is_named() {
        let e = Config::from_json_str(r#"{"model_type":"gpt_neox"}"#, p()).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("config.json") && m.contains("gpt_neox") && m.contains("llama"),
            "{m}"
        );
    }

    #[test]
    fn missing_key_is_named() {
        let e =
            Config::from_json_str(r#"{"model_type":"llama","vocab_size":10}"#, p()).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn llama3_rope_scaling_lowers_low_frequencies() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
          "num_hidden_layers":1,"num_attention_heads":1,"rope_theta":500000.0,
          "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
          "original_max_position_embeddings":8192}}"#;
        let c = Config::from_json_str(text, p()).unwrap();
        let mut plain = c.clone();
        plain.rope_scaling = None;
        let (a, b) = (c.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(a[0], b[0]); // highest frequency untouched
        assert!((a[31] - b[31] / 8.0).abs() < 1e-15); // lowest divided by factor
    }
}
