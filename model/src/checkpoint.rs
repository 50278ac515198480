//! One view over every checkpoint kind: an HF folder (safetensors, dense or compressed-tensors
//! `pack-quantized` / `sparse-bitmask`: see [`crate::compressed`]) or a GGUF file. Tensors are
//! addressed by their HF names, read lazily and converted to f32 one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::compressed::HfWeights;
use crate::config::Config;
use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};
use crate::gguf::{self, GgufFile};

/// What one tensor is, without reading it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// HF name (GGUF-only tensors keep their GGUF name).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Storage type name (`BF16`, `Q4_1`, ...).
    pub dtype: String,
    /// Bytes of data on disk.
    pub bytes: u64,
}

impl TensorMeta {
    /// Number of values.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

enum Source {
    Hf(HfWeights),
    Gguf {
        file: GgufFile,
        hf_to_gguf: BTreeMap<String, usize>,
        permute: bool,
    },
}

/// An opened teacher or student checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    config: Config,
    source: Source,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format())
            .finish()
    }
}

impl Checkpoint {
    /// Opens an HF folder or a `.gguf` file and validates its header and config, and that
    /// the config claims no more layers, heads or vocabulary than its tensors hold.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        let ckpt = if meta.is_dir() {
            let cfg_path = path.join("config.json");
            let text = crate::io::read_text(&cfg_path, crate::io::CONFIG_LIMIT)?;
            let config = Config::from_json_str(&text, &cfg_path)?;
            let weights = HfWeights::open(path, &text, &cfg_path)?;
            Self {
                path: path.into(),
                config,
                source: Source::Hf(weights),
            }
        } else {
            let file = GgufFile::open(path)?;
            let config = file.config()?;
            let mut hf_to_gguf = BTreeMap::new();
            for (i, t) in file.tensors().iter().enumerate() {
                let name = gguf::gguf_to_hf_name(&t.name).unwrap_or_else(|| t.name.clone());
                if let Some(j) = hf_to_gguf.insert(name, i) {
                    return Err(ModelError::format(
                        path,
                        format!(
                            "tensors `{}` and `{}` name the same HF tensor",
                            clip(&file.tensors()[j].name, MAX_NAME_CHARS),
                            clip(&t.name, MAX_NAME_CHARS)
                        ),
                    ));
                }
            }
            let permute = file.arch()? != "qwen2";
            Self {
                path: path.into(),
                config,
                source: Source::Gguf {
                    file,
                    hf_to_gguf,
                    permute,
                },
            }
        };
        ckpt.check_counts()?;
        Ok(ckpt)
    }

    /// Numel of a tensor by HF name, if present.
    fn numel_of(&self, name: &str) -> Option<u64> {
        let shape = match &self.source {
            Source::Hf(w) => w.shape(name)?,
            Source::Gguf {
                file, hf_to_gguf, ..
            } => file.tensors()[*hf_to_gguf.get(name)?].shape.as_slice(),
        };
        // Products were checked for overflow when the file was opened.
        Some(shape.iter().map(|&d| d as u64).product())
    }

    /// Refuses a config that claims more layers, heads or vocabulary than the tensors present
    /// can hold, before anything sized by those counts (the list of expected tensors, per-layer
    /// state) is allocated: a `block_count` of 2^24 must not make `convert` build 150 million
    /// names. Layers are counted in the tensor index; the widths are checked against the
    /// element counts of the embedding and of block 0's tensors where those exist (their
    /// exact shapes are [`Self::check_shapes`]'s and [`Self::read`]'s job).
    fn check_counts(&self) -> Result<()> {
        let c = &self.config;
        let (path, key) = match &self.source {
            Source::Hf(_) => (self.path.join("config.json"), None),
            Source::Gguf { file, .. } => (self.path.clone(), Some(file)),
        };
        // The key a field was read from: the config.json key, or the GGUF metadata key.
        let key = |field: &str| key.map_or_else(|| field.to_string(), |g| g.config_key(field));
        let names: Vec<&str> = match &self.source {
            Source::Hf(w) => w.names().collect(),
            Source::Gguf { hf_to_gguf, .. } => hf_to_gguf.keys().map(String::as_str).collect(),
        };
        let layers: BTreeSet<usize> = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix("model.layers.")?
                    .split_once('.')?
                    .0
                    .parse()
                    .ok()
            })
            .collect();
        if c.num_hidden_layers > layers.len() {
            return Err(ModelError::config(
                &path,
                format!(
                    "`{}` = {} but the tensors hold {} layer(s)",
                    key("num_hidden_layers"),
                    c.num_hidden_layers,
                    layers.len()
                ),
            ));
        }
        let (h, hd) = (c.hidden_size as u64, c.head_dim() as u64);
        let checks = [
            ("hidden_size", "model.norm.weight", h),
            (
                "vocab_size",
                "model.embed_tokens.weight",
                c.vocab_size as u64 * h,
            ),
            (
                "num_attention_heads",
                "model.layers.0.self_attn.q_proj.weight",
                c.num_attention_heads as u64 * hd * h,
            ),
            (
                "num_key_value_heads",
                "model.layers.0.self_attn.k_proj.weight",
                c.num_kv_heads() as u64 * hd * h,
            ),
            (
                "intermediate_size",
                "model.layers.0.mlp.gate_proj.weight",
                c.intermediate_size as u64 * h,
            ),
        ];
        for (field, tensor, want) in checks {
            if let Some(have) = self.numel_of(tensor)
                && want > have
            {
                return Err(ModelError::config(
                    &path,
                    format!(
                        "`{}` implies {want} values in `{tensor}`, which holds {have}",
                        key(field)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `safetensors`, `gguf`, or for a compressed-tensors folder `safetensors (FORMAT)`.
    pub fn format(&self) -> &'static str {
        match &self.source {
            Source::Hf(w) => match w.format() {
                None => "safetensors",
                Some(crate::compressed::PACK_QUANTIZED) => "safetensors (pack-quantized)",
                Some(_) => "safetensors (sparse-bitmask)",
            },
            Source::Gguf { .. } => "gguf",
        }
    }

    /// The GGUF file, when this is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf { file, .. } => Some(file),
            Source::Hf(_) => None,
        }
    }

    /// Every tensor's name, shape, storage type and size (a compressed linear is one tensor
    /// `X.weight`, its type naming the format and its size that of its stored parts).
    pub fn tensors(&self) -> Vec<TensorMeta> {
        match &self.source {
            Source::Hf(w) => w.metas(),
            Source::Gguf {
                file, hf_to_gguf, ..
            } => hf_to_gguf
                .iter()
                .map(|(name, &i)| {
                    let t = &file.tensors()[i];
                    TensorMeta {
                        name: name.clone(),
                        shape: t.shape.clone(),
                        dtype: t.ty.name().into(),
                        bytes: t.nbytes as u64,
                    }
                })
                .collect(),
        }
    }

    /// Checks that every tensor the config implies is present with the implied shape (the
    /// element count for GGUF, which stores dimensions in its own order), so a config that
    /// disagrees with its tensors, e.g. a structurally pruned model whose config was edited,
    /// is refused before any work starts.
    pub fn check_shapes(&self) -> Result<()> {
        let metas: BTreeMap<String, TensorMeta> = self
            .tensors()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let gguf = matches!(self.source, Source::Gguf { .. });
        for (name, shape) in self.expected_tensors() {
            let Some(t) = metas.get(&name) else {
                return Err(ModelError::format(
                    &self.path,
                    format!("`{name}`, which config.json implies, is missing"),
                ));
            };
            let want: u64 = shape.iter().map(|&d| d as u64).product();
            let ok = if gguf {
                t.numel() == want
            } else {
                t.shape == shape
            };
            if !ok {
                return Err(ModelError::format(
                    &self.path,
                    format!(
                        "`{name}` has shape {:?} but the config implies {shape:?} (config and tensors disagree)",
                        t.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether a tensor of this HF name exists.
    pub fn has(&self, name: &str) -> bool {
        match &self.source {
            Source::Hf(w) => w.shape(name).is_some(),
            Source::Gguf { hf_to_gguf, .. } => hf_to_gguf.contains_key(name),
        }
    }

    /// Bytes of the checkpoint's weight files on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        match &self.source {
            Source::Hf(w) => w.bytes_on_disk(),
            Source::Gguf { file, .. } => file.file_len(),
        }
    }

    /// Reads a tensor as f32 in HF layout, checking its shape (before reading anything) and
    /// that every value is finite.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let missing = || ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        };
        let shape = match &self.source {
            Source::Hf(w) => w.shape(name).ok_or_else(missing)?,
            Source::Gguf {
                file, hf_to_gguf, ..
            } => file.tensors()[*hf_to_gguf.get(name).ok_or_else(missing)?]
                .shape
                .as_slice(),
        };
        // Shapes are loop bounds below (the q/k un-permutation): check them first.
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: shape.to_vec(),
            });
        }
        let data = match &self.source {
            Source::Hf(w) => w.read_f32(name)?.ok_or_else(missing)?,
            Source::Gguf {
                file,
                hf_to_gguf,
                permute,
            } => {
                let &i = hf_to_gguf
                    .get(name)
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: self.path.clone(),
                        tensor: name.into(),
                    })?;
                let t = &file.tensors()[i];
                let mut data = file.read_f32(t);
                // llama.cpp stores q/k rows interleaved per rotary pair for the `llama` arch.
                if *permute {
                    let heads = if name.contains("self_attn.q_proj") {
                        Some(self.config.num_attention_heads)
                    } else if name.contains("self_attn.k_proj") {
                        Some(self.config.num_kv_heads())
                    } else {
                        None
                    };
                    // A 0-dimensional tensor has no rows to permute.
                    if let Some(h) = heads
                        && let Some(&rows) = t.shape.first()
                    {
                        let cols = if t.shape.len() > 1 { t.shape[1] } else { 1 };
                        if rows % h == 0 && (rows / h) % 2 == 0 {
                            data = gguf::unpermute_rows(&data, rows, cols, h);
                        }
                    }
                }
                data
            }
        };
        let bad = data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(ModelError::NonFinite {
                path: self.path.clone(),
                tensor: name.into(),
                count: bad,
            });
        }
        Ok(data)
    }

    /// The HF names and shapes of every tensor the architecture needs, in file order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        expected_tensors(&self.config)
    }
}

/// The HF names and shapes a config implies (embedding, blocks, final norm, lm_head).
pub fn expected_tensors(c: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..c.num_hidden_layers {
        out.extend(block_tensors(c, l));
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    out
}

/// The HF names and shapes of block `l`'s tensors.
pub fn block_tensors(c: &Config, l: usize) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim();
    let kv = c.num_kv_heads() * c.head_dim();
    let p = format!("model.layers.{l}");
    let mut out = vec![
        (format!("{p}.input_layernorm.weight"), vec![h]),
        (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
        (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
        (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
    ];
    if c.qkv_bias() {
        out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
        out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
        out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
    }
    if c.o_bias() {
        out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
    }
    if c.mlp_bias {
        out.push((format!("{p}.mlp.gate_proj.bias"), vec![i]));
        out.push((format!("{p}.mlp.up_proj.bias"), vec![i]));
        out.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
    }
    out
}
