//! GGUF metadata as llama.cpp's converter writes it: architecture keys from the config, and
//! the tokenizer (copied key by key from a GGUF source, or built from an HF `tokenizer.json`
//! as llama.cpp's `gpt2` model; see [`crate::gguf_export`] for the rules).

use std::path::Path;

use model::Checkpoint;
use model::gguf::writer::{MetaArray, MetaValue};
use serde_json::Value;

use crate::gguf_export::{ExportError, Result};
use crate::gguf_plan::TypePlan;

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

/// All metadata in llama.cpp's converter order.
pub(crate) fn metadata(
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
