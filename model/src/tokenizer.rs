//! Tokenizers: the `tokenizers` crate from `tokenizer.json`, or a `tokenizer.json` built from
//! GGUF metadata (`gpt2` byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names, or
//! `llama` SentencePiece as BPE with byte fallback). Building the JSON (rather than the Rust
//! objects) means the converter writes exactly the tokenizer that was evaluated.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::checkpoint::Checkpoint;
use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};
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

    /// Loads an HF `tokenizer.json` (a regular file of at most [`crate::io::TOKENIZER_LIMIT`]
    /// bytes).
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = crate::io::read_text(path, crate::io::TOKENIZER_LIMIT)?;
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

    /// Checks that every id this tokenizer can produce, and the config's BOS/EOS ids, index
    /// a row of `ckpt`'s embedding (`vocab_size` rows, which `Checkpoint::check_shapes`
    /// holds to the tensor): a model written with a larger tokenizer would read past its
    /// embedding. Converters call it before writing.
    pub fn check_vocab(&self, ckpt: &Checkpoint) -> Result<()> {
        let max = self
            .inner
            .get_vocab(true)
            .into_iter()
            .max_by_key(|(_, id)| *id);
        check_ids(ckpt, &self.source, max)
    }
}

/// Refuses a largest token id (`max`: the token and its id, from `source`) or config BOS/EOS
/// ids outside `ckpt`'s vocabulary.
fn check_ids(ckpt: &Checkpoint, source: &Path, max: Option<(String, u32)>) -> Result<()> {
    let vocab = ckpt.config().vocab_size;
    let (cfg_path, key) = match ckpt.gguf() {
        Some(g) => (g.path().to_path_buf(), g.config_key("vocab_size")),
        None => (ckpt.path().join("config.json"), "vocab_size".to_string()),
    };
    if let Some((token, id)) = max
        && id as usize >= vocab
    {
        return Err(ModelError::Tokenizer {
            path: source.into(),
            msg: format!(
                "token `{}` has id {id}, outside the model's vocabulary: `{key}` is {vocab} (in {})",
                clip(&token, MAX_NAME_CHARS),
                cfg_path.display()
            ),
        });
    }
    let c = ckpt.config();
    for (name, ids) in [
        ("bos_token_id", &c.bos_token_id),
        ("eos_token_id", &c.eos_token_id),
    ] {
        let ids = match ids {
            None => &[][..],
            Some(crate::config::TokenIds::One(id)) => std::slice::from_ref(id),
            Some(crate::config::TokenIds::Many(v)) => &v[..],
        };
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            let key = match ckpt.gguf() {
                Some(_) => format!("tokenizer.ggml.{name}"),
                None => name.to_string(),
            };
            return Err(ModelError::config(
                &cfg_path,
                format!("`{key}` = {id} is outside the vocabulary of {vocab} tokens"),
            ));
        }
    }
    Ok(())
}

/// As [`load_checked`] without building a tokenizer from GGUF metadata (its token list is
/// checked instead), and without requiring an HF folder's `tokenizer.json` (checked when
/// present): for commands that copy the tokenizer as it is.
pub fn check_fits(ckpt: &Checkpoint) -> Result<()> {
    match ckpt.gguf() {
        Some(g) => {
            let key = "tokenizer.ggml.tokens";
            let last = match g.array(key) {
                Some(a) => match a.strings() {
                    Some(s) => a.len().checked_sub(1).and_then(|i| {
                        let t = s.last()?.into_owned();
                        Some((t, u32::try_from(i).unwrap_or(u32::MAX)))
                    }),
                    None => {
                        return Err(ModelError::Tokenizer {
                            path: g.path().into(),
                            msg: format!("`{key}` is not an array of strings"),
                        });
                    }
                },
                None => None,
            };
            check_ids(ckpt, g.path(), last)
        }
        None => {
            let tj = ckpt.path().join("tokenizer.json");
            if !tj.exists() {
                return check_ids(ckpt, &tj, None);
            }
            Tokenizer::from_file(&tj)?.check_vocab(ckpt)
        }
    }
}

/// Loads `ckpt`'s tokenizer ([`crate::load_tokenizer`]) and checks it fits the model's
/// vocabulary ([`Tokenizer::check_vocab`]): for commands that write a model.
pub fn load_checked(ckpt: &Checkpoint) -> Result<Tokenizer> {
    let tok = crate::load_tokenizer(ckpt)?;
    tok.check_vocab(ckpt)?;
    Ok(tok)
}

fn str_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<Cow<'a, str>>> {
    let arr = file.array(key).ok_or_else(|| ModelError::Tokenizer {
        path: file.path().into(),
        msg: format!("missing `{key}` (or not an array)"),
    })?;
    let items = arr.strings().ok_or_else(|| ModelError::Tokenizer {
        path: file.path().into(),
        msg: format!("`{key}` is not an array of strings"),
    })?;
    Ok(items.collect())
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
        .array("tokenizer.ggml.token_type")
        .and_then(|a| a.ints())
        .map(|a| a.take(tokens.len()).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let bos = file
        .get_u64("tokenizer.ggml.bos_token_id")
        .map(|v| v as usize);
    let unk = file
        .get_u64("tokenizer.ggml.unknown_token_id")
        .map(|v| v as usize);
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
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
                .iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').unwrap_or((m.as_ref(), ""));
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
                .array("tokenizer.ggml.scores")
                .and_then(|a| a.floats())
                .map(|a| a.take(tokens.len()).collect())
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
    if add_bos && let Some(b) = bos.and_then(|b| tokens.get(b).map(|t| (b, t.as_ref()))) {
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
fn spm_merges(tokens: &[Cow<'_, str>], types: &[i64], scores: &[f64]) -> Vec<Value> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_ref(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 || t.chars().count() < 2 {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                // A NaN score ranks last: compared as NaN it broke the sort's total order,
                // which panics (found by the `tokenizer_gguf` fuzz target).
                let score = scores.get(id).copied().unwrap_or(0.0);
                let score = if score.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    score
                };
                merges.push((score, id, ia, ib));
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
        .map(|(_, _, a, b)| json!([tokens[a].as_ref(), tokens[b].as_ref()]))
        .collect()
}
