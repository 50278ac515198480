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
    /// Parses and validates `config.json` text; `path` names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        // Check the family before the fields, so an unknown model gets the clearer message.
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(path, format!("invalid JSON: {e}")))?;
        match raw.get("model_type").and_then(|v| v.as_str()) {
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
            _ => {}
        }
        let cfg: Config =
            serde_json::from_value(raw).map_err(|e| ModelError::config(path, e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
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
                "llama3" => {
                    if rs.factor.is_none()
                        || rs.low_freq_factor.is_none()
                        || rs.high_freq_factor.is_none()
                        || rs.original_max_position_embeddings.is_none()
                    {
                        return err("rope_scaling llama3 needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings".into());
                    }
                }
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

    /// Parameters implied by the config (weights and biases, lm_head counted once if tied).
    pub fn num_params(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let (q, kv) = (
            (self.num_attention_heads * self.head_dim()) as u64,
            (self.num_kv_heads() * self.head_dim()) as u64,
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
        v * h + self.num_hidden_layers as u64 * block + h + head
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
