//! Tokenizers: the `tokenizers` crate from `tokenizer.json`, or a `tokenizer.json` built from
//! GGUF metadata (`gpt2` byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names, or
//! `llama` SentencePiece as BPE with byte fallback). Building the JSON (rather than the Rust
//! objects) means the converter writes exactly the tokenizer that was evaluated.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// Pre-tokenizers known by llama.cpp's `tokenizer.ggml.pre` name.
pub const KNOWN_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "smollm",
    "llama3",
    "llama-bpe",
    "llama-v3",
    "qwen2",
];

/// A loaded tokenizer plus whether it puts BOS first.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    /// Beginning-of-sequence id, if any.
    pub bos_id: Option<u32>,
    /// Whether encoding with special tokens puts BOS first (llama.cpp's `add_bos`).
    pub add_bos: bool,
    /// Where it came from.
    pub source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.into(),
        msg: e.to_string(),
    }
}

impl Tokenizer {
    /// Parses `tokenizer.json` text.
    pub fn from_json(json: String, source: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| tok_err(source, e))?;
        // Probe whether the post-processor adds a leading token, as HF does when add_bos.
        let with = inner
            .encode_fast("a", true)
            .map_err(|e| tok_err(source, e))?;
        let without = inner
            .encode_fast("a", false)
            .map_err(|e| tok_err(source, e))?;
        let (w, wo) = (with.get_ids(), without.get_ids());
        let add_bos =
            w.len() > wo.len() && w.ends_with(wo) || (w.len() > wo.len() && w[1..].starts_with(wo));
        let bos_id = if add_bos { Some(w[0]) } else { None };
        Ok(Self {
            inner,
            json,
            bos_id,
            add_bos,
            source: source.into(),
        })
    }

    /// Loads an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(json, path)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = gguf_tokenizer_json(file)?;
        Self::from_json(
            serde_json::to_string(&json).expect("serializable"),
            file.path(),
        )
    }

    /// Token ids of `text`, without special tokens (BOS handling is the caller's protocol).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The `tokenizer.json` text this tokenizer was built from.
    pub fn to_json(&self) -> &str {
        &self.json
    }
}

fn str_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = file.get_array(key).ok_or_else(|| ModelError::Tokenizer {
        path: file.path().into(),
        msg: format!("missing `{key}`"),
    })?;
    arr.iter()
        .map(|v| {
            v.as_str().ok_or_else(|| ModelError::Tokenizer {
                path: file.path().into(),
                msg: format!("`{key}` holds a non-string"),
            })
        })
        .collect()
}

fn byte_level() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
}

fn split_then_byte_level(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]})
}

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` name, as HF JSON.
fn pre_tokenizer(pre: &str, path: &Path) -> Result<Value> {
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level()]}),
        "llama3" | "llama-bpe" | "llama-v3" => split_then_byte_level(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" => split_then_byte_level(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        other => {
            return Err(ModelError::Tokenizer {
                path: path.into(),
                msg: format!(
                    "unknown tokenizer.ggml.pre `{other}` (known: {})",
                    KNOWN_PRE.join(", ")
                ),
            });
        }
    })
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Builds HF `tokenizer.json` from GGUF metadata.
pub fn gguf_tokenizer_json(file: &GgufFile) -> Result<Value> {
    let path = file.path();
    let model = file.get_str("tokenizer.ggml.model").unwrap_or("");
    let tokens = str_array(file, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = file
        .get_array("tokenizer.ggml.token_type")
        .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let bos = file
        .get_u64("tokenizer.ggml.bos_token_id")
        .map(|v| v as usize);
    let unk = file
        .get_u64("tokenizer.ggml.unknown_token_id")
        .map(|v| v as usize);
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_CONTROL}));
        }
    }
    let (default_bos, mut out) = match model {
        "gpt2" => {
            let merges: Vec<Value> = str_array(file, "tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                    json!([a, b])
                })
                .collect();
            let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
            (
                false,
                json!({
                    "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": pre_tokenizer(pre, path)?,
                    "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                        "vocab": vocab, "merges": merges}
                }),
            )
        }
        "llama" => {
            let scores: Vec<f64> = file
                .get_array("tokenizer.ggml.scores")
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
                .unwrap_or_else(|| vec![0.0; tokens.len()]);
            let merges = spm_merges(&tokens, &types, &scores);
            let add_space = file
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true);
            let mut norm =
                vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
            if add_space {
                norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            let unk_tok = unk.and_then(|u| tokens.get(u)).map(|s| s.to_string());
            (
                true,
                json!({
                    "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": norm},
                    "pre_tokenizer": null,
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": if add_space {1} else {0}, "stop": 0}]},
                    "model": {"type": "BPE", "dropout": null, "unk_token": unk_tok, "continuing_subword_prefix": null,
                        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                        "vocab": vocab, "merges": merges}
                }),
            )
        }
        other => {
            return Err(ModelError::Tokenizer {
                path: path.into(),
                msg: format!("unsupported tokenizer.ggml.model `{other}` (supported: gpt2, llama)"),
            });
        }
    };
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(default_bos);
    if add_bos && let Some(b) = bos.and_then(|b| tokens.get(b).map(|t| (b, *t))) {
        out["post_processor"] = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b.1, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b.1, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b.1, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.1: {"id": b.1, "ids": [b.0], "tokens": [b.1]}}});
    }
    Ok(out)
}

/// SentencePiece BPE merges recovered from the vocabulary: every split of a normal token into
/// two tokens of the vocabulary is a merge, ranked by the merged token's score (highest
/// first), which is the order in which llama.cpp's SPM tokenizer applies them.
fn spm_merges(tokens: &[&str], types: &[i64], scores: &[f64]) -> Vec<Value> {
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 || t.chars().count() < 2 {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), id, ia, ib));
            }
        }
    }
    merges.sort_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    merges
        .into_iter()
        .map(|(_, _, a, b)| json!([tokens[a], tokens[b]]))
        .collect()
}
