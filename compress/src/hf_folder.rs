//! The files around the weights of an HF folder: `config.json`, the tokenizer files and
//! `generation_config.json`, copied from an HF source or built from GGUF metadata.

use std::path::Path;

use model::safetensors_io::StoreDtype;
use model::{Checkpoint, Config, Tokenizer};
use serde_json::{Value, json};

/// Storage type of the weights of a written HF folder (`--dtype`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float: no rounding of reconstructed weights (SparseGPT's updates, dequantized GGUF).
    F32,
    /// IEEE half.
    F16,
    /// bfloat16: half the bytes of f32.
    Bf16,
}

impl From<Dtype> for StoreDtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => StoreDtype::F32,
            Dtype::F16 => StoreDtype::F16,
            Dtype::Bf16 => StoreDtype::BF16,
        }
    }
}

/// Writes `config.json` for weights stored as `dtype`, with `extra` keys merged in (e.g. a
/// `quantization_config`); returns the config written.
pub fn write_config(
    ckpt: &Checkpoint,
    dtype: StoreDtype,
    dir: &Path,
    extra: Option<Value>,
) -> anyhow::Result<Config> {
    write_config_for(ckpt.config(), dtype, dir, extra)
}

/// As [`write_config`] for a config other than the checkpoint's (a structurally pruned
/// model's: fewer heads, channels or layers).
pub fn write_config_for(
    config: &Config,
    dtype: StoreDtype,
    dir: &Path,
    extra: Option<Value>,
) -> anyhow::Result<Config> {
    let mut cfg = config.clone();
    cfg.torch_dtype = Some(dtype.torch_name().into());
    cfg.num_key_value_heads = Some(cfg.num_kv_heads());
    if cfg.architectures.is_empty() {
        cfg.architectures = vec![
            if cfg.model_type == "qwen2" {
                "Qwen2ForCausalLM"
            } else {
                "LlamaForCausalLM"
            }
            .into(),
        ];
    }
    let mut v = serde_json::to_value(&cfg)?;
    if let (Some(Value::Object(extra)), Value::Object(m)) = (extra, &mut v) {
        m.extend(extra);
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&v)?)?;
    Ok(cfg)
}

/// Writes the tokenizer files and `generation_config.json`: copies of an HF source's files
/// when present, else built from the tokenizer (and the GGUF's chat template).
pub fn write_aux(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    cfg: &Config,
    dir: &Path,
) -> anyhow::Result<()> {
    let src_dir = ckpt.path().is_dir().then_some(ckpt.path());
    std::fs::write(dir.join("tokenizer.json"), tok.to_json())?;
    let bos = cfg.bos_token_id.as_ref().and_then(|b| b.first());
    let eos = cfg.eos_token_id.as_ref().and_then(|b| b.first());
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let copied = |f: &str| -> anyhow::Result<bool> {
        if let Some(d) = src_dir
            && d.join(f).exists()
        {
            model::io::copy_side_file(&d.join(f), &dir.join(f))?;
            return Ok(true);
        }
        Ok(false)
    };
    if !copied("tokenizer_config.json")? {
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.add_bos,
            "model_max_length": cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(b) = name(bos) {
            tc["bos_token"] = json!(b);
        }
        if let Some(e) = name(eos) {
            tc["eos_token"] = json!(e);
        }
        if let Some(t) = ckpt
            .gguf()
            .and_then(|g| g.get_str("tokenizer.chat_template"))
        {
            tc["chat_template"] = json!(t);
        }
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc)?,
        )?;
    }
    if !copied("generation_config.json")? {
        let gc = json!({"_from_model_config": true, "bos_token_id": bos, "eos_token_id": eos});
        std::fs::write(
            dir.join("generation_config.json"),
            serde_json::to_string_pretty(&gc)?,
        )?;
    }
    Ok(())
}
