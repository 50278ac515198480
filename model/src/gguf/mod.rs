//! GGUF reading: a bounds-checked pre-scan of the header, metadata and tensor infos through
//! gguf-rs, and dequantization of tensors to f32 with llama.cpp's q/k row permutation undone
//! so the weights are in Hugging Face's layout.

pub mod blocks;
mod prescan;
pub mod writer;

use std::collections::BTreeMap;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;

use crate::config::Config;
use crate::error::{ModelError, Result};
use blocks::*;

/// The GGML tensor types this crate knows by id (llama.cpp `enum ggml_type`).
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
    /// A valid GGML type this crate cannot dequantize (id and name kept for messages).
    Other(u32, &'static str),
}

impl GgmlType {
    /// Maps a GGML type id; `None` for ids no GGML version defines.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            30 => BF16,
            9 => Other(9, "Q8_1"),
            10 => Other(10, "Q2_K"),
            11 => Other(11, "Q3_K"),
            15 => Other(15, "Q8_K"),
            16 => Other(16, "IQ2_XXS"),
            17 => Other(17, "IQ2_XS"),
            18 => Other(18, "IQ3_XXS"),
            19 => Other(19, "IQ1_S"),
            20 => Other(20, "IQ4_NL"),
            21 => Other(21, "IQ3_S"),
            22 => Other(22, "IQ2_S"),
            23 => Other(23, "IQ4_XS"),
            24 => Other(24, "I8"),
            25 => Other(25, "I16"),
            26 => Other(26, "I32"),
            27 => Other(27, "I64"),
            28 => Other(28, "F64"),
            29 => Other(29, "IQ1_M"),
            34 => Other(34, "TQ1_0"),
            35 => Other(35, "TQ2_0"),
            39 => Other(39, "MXFP4"),
            _ => return None,
        })
    }

    /// The GGML id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            BF16 => 30,
            Other(id, _) => id,
        }
    }

    /// llama.cpp's name of the type.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            BF16 => "BF16",
            Other(_, n) => n,
        }
    }

    /// (values per block, bytes per block), `None` for types this crate cannot read.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        let sz = std::mem::size_of::<BlockQ8_0>;
        Some(match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q8_0 => (QK, sz()),
            Q4_0 => (QK, std::mem::size_of::<BlockQ4_0>()),
            Q4_1 => (QK, std::mem::size_of::<BlockQ4_1>()),
            Q5_0 => (QK, std::mem::size_of::<BlockQ5_0>()),
            Q5_1 => (QK, std::mem::size_of::<BlockQ5_1>()),
            Q4_K => (QK_K, std::mem::size_of::<BlockQ4K>()),
            Q5_K => (QK_K, std::mem::size_of::<BlockQ5K>()),
            Q6_K => (QK_K, std::mem::size_of::<BlockQ6K>()),
            Other(..) => return None,
        })
    }
}

/// Expands `bytes` of type `ty` into `out` (whose length is the number of values).
/// The caller guarantees `bytes` holds exactly the blocks for `out.len()` values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    use rayon::prelude::*;
    match ty {
        GgmlType::F32 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q8_0 => dequantize_blocks::<BlockQ8_0>(bytes, out),
        GgmlType::Q4_0 => dequantize_blocks::<BlockQ4_0>(bytes, out),
        GgmlType::Q4_1 => dequantize_blocks::<BlockQ4_1>(bytes, out),
        GgmlType::Q5_0 => dequantize_blocks::<BlockQ5_0>(bytes, out),
        GgmlType::Q5_1 => dequantize_blocks::<BlockQ5_1>(bytes, out),
        GgmlType::Q4_K => dequantize_blocks::<BlockQ4K>(bytes, out),
        GgmlType::Q5_K => dequantize_blocks::<BlockQ5K>(bytes, out),
        GgmlType::Q6_K => dequantize_blocks::<BlockQ6K>(bytes, out),
        GgmlType::Other(..) => unreachable!("rejected when the file was opened"),
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Name in the file (`blk.0.attn_q.weight`).
    pub name: String,
    /// Storage type.
    pub ty: GgmlType,
    /// Shape in row-major order (outermost first), i.e. GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Bytes of data.
    pub nbytes: usize,
}

/// An open GGUF file: metadata, tensor table and the memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<GgufTensor>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file; every length and offset is checked against the file
    /// size before anything is allocated from it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only and the file is not modified by this process; a
        // concurrent writer would be a user error that can at worst corrupt values read.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        prescan::check(&mmap, path)?;

        let mut reader = BufReader::new(file);
        reader
            .seek(SeekFrom::Start(4))
            .map_err(|e| ModelError::io(path, e))?;
        let mut container =
            gguf_rs::GGUFContainer::new(gguf_rs::ByteOrder::LE, Box::new(reader), u64::MAX);
        let model = container
            .decode()
            .map_err(|e| ModelError::format(path, format!("invalid GGUF header: {e}")))?;
        let data_offset = model.data_offset() as usize;
        let alignment = model.alignment() as usize;
        let file_len = mmap.len();
        let mut tensors = Vec::with_capacity(model.tensors().len());
        for t in model.tensors() {
            let ty = GgmlType::from_id(t.kind).ok_or_else(|| {
                ModelError::format(
                    path,
                    format!("tensor `{}` has unknown type id {}", t.name, t.kind),
                )
            })?;
            let (blk, bsz) = ty
                .block_layout()
                .ok_or_else(|| ModelError::UnsupportedDtype {
                    path: path.into(),
                    tensor: t.name.clone(),
                    dtype: ty.name().into(),
                })?;
            let numel = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| {
                    usize::try_from(d).ok().and_then(|d| a.checked_mul(d))
                })
                .ok_or_else(|| {
                    ModelError::format(
                        path,
                        format!("tensor `{}`: dimensions {:?} overflow", t.name, t.shape),
                    )
                })?;
            let row = t.shape.first().copied().unwrap_or(1) as usize;
            if !row.is_multiple_of(blk) {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensor `{}`: row length {row} is not a multiple of the {} block size {blk}",
                        t.name,
                        ty.name()
                    ),
                ));
            }
            let nbytes = (numel / blk).checked_mul(bsz).ok_or_else(|| {
                ModelError::format(path, format!("tensor `{}`: byte size overflows", t.name))
            })?;
            let rel = usize::try_from(t.offset).unwrap_or(usize::MAX);
            let offset = data_offset.checked_add(rel);
            let end = offset.and_then(|o| o.checked_add(nbytes));
            match (offset, end) {
                (Some(o), Some(e)) if e <= file_len => {
                    if o % alignment != 0 {
                        return Err(ModelError::format(
                            path,
                            format!(
                                "tensor `{}`: offset {o} is not aligned to {alignment}",
                                t.name
                            ),
                        ));
                    }
                    tensors.push(GgufTensor {
                        name: t.name.clone(),
                        ty,
                        shape: t.shape.iter().rev().map(|&d| d as usize).collect(),
                        offset: o,
                        nbytes,
                    })
                }
                _ => {
                    return Err(ModelError::format(
                        path,
                        format!(
                            "tensor `{}` claims {nbytes} bytes at data offset {} but the file has only {file_len} bytes",
                            t.name, t.offset
                        ),
                    ));
                }
            }
        }
        let mut by_offset: Vec<&GgufTensor> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].nbytes > w[1].offset {
                return Err(ModelError::format(
                    path,
                    format!("tensors `{}` and `{}` overlap", w[0].name, w[1].name),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{}` appears twice", t.name),
                ));
            }
        }
        Ok(Self {
            path: path.into(),
            mmap,
            metadata: model.metadata().clone(),
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// All metadata key/values.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }
    /// The tensor table.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }
    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }
    /// A tensor by GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.nbytes]
    }

    /// Dequantizes a tensor to f32 and lets the kernel drop its pages.
    pub fn read_f32(&self, t: &GgufTensor) -> Vec<f32> {
        let numel: usize = t.shape.iter().product();
        let mut out = vec![0f32; numel];
        dequantize(t.ty, self.tensor_bytes(t), &mut out);
        crate::release_pages(&self.mmap, t.offset, t.nbytes);
        out
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.as_str())
    }
    /// An integer metadata value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(|v| v.as_u64())
    }
    /// A float metadata value.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(|v| v.as_f64())
    }
    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.metadata.get(key).and_then(|v| v.as_bool())
    }
    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Option<&Vec<Value>> {
        self.metadata.get(key).and_then(|v| v.as_array())
    }

    /// The architecture (`general.architecture`).
    pub fn arch(&self) -> Result<&str> {
        self.get_str("general.architecture").ok_or_else(|| {
            ModelError::config(&self.path, "missing metadata key `general.architecture`")
        })
    }

    /// Builds the HF-style config from `{arch}.*` metadata.
    pub fn config(&self) -> Result<Config> {
        let arch = self.arch()?;
        let model_type = match arch {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            other => {
                return Err(ModelError::config(
                    &self.path,
                    format!(
                        "unknown general.architecture `{other}` (known: llama, mistral, qwen2)"
                    ),
                ));
            }
        };
        let need = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            self.get_u64(&key).map(|v| v as usize).ok_or_else(|| {
                ModelError::config(&self.path, format!("missing metadata key `{key}`"))
            })
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv = self
            .get_u64(&format!("{arch}.attention.head_count_kv"))
            .map(|v| v as usize);
        let vocab = self
            .get_u64(&format!("{arch}.vocab_size"))
            .map(|v| v as usize)
            .or_else(|| self.get_array("tokenizer.ggml.tokens").map(|a| a.len()))
            .or_else(|| {
                self.tensor("token_embd.weight")
                    .and_then(|t| t.shape.first().copied())
            })
            .ok_or_else(|| ModelError::config(&self.path, "cannot tell the vocabulary size"))?;
        let head_dim = self
            .get_u64(&format!("{arch}.attention.key_length"))
            .map(|v| v as usize)
            .filter(|&d| heads > 0 && d != hidden / heads);
        if let Some(t) = self.get_str(&format!("{arch}.rope.scaling.type"))
            && t != "none"
        {
            return Err(ModelError::config(
                &self.path,
                format!("rope scaling `{t}` in GGUF is not supported"),
            ));
        }
        let tok_id = |k: &str| {
            self.get_u64(k)
                .map(|v| crate::config::TokenIds::One(v as u32))
        };
        let cfg = Config {
            architectures: vec![
                if model_type == "qwen2" {
                    "Qwen2ForCausalLM"
                } else {
                    "LlamaForCausalLM"
                }
                .into(),
            ],
            model_type: model_type.into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            hidden_act: "silu".into(),
            max_position_embeddings: need("context_length")?,
            rms_norm_eps: self
                .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .ok_or_else(|| {
                    ModelError::config(
                        &self.path,
                        format!("missing metadata key `{arch}.attention.layer_norm_rms_epsilon`"),
                    )
                })?,
            rope_theta: self
                .get_f64(&format!("{arch}.rope.freq_base"))
                .unwrap_or(10_000.0),
            rope_scaling: None,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            attention_bias: model_type == "llama" && self.tensor("blk.0.attn_q.bias").is_some(),
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id"),
            torch_dtype: Some("float32".into()),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }
}

/// Maps a GGUF tensor name to its HF name (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`); `None` for tensors HF has no name for.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's q/k row permutation (its converter interleaves the two rotary halves
/// of each head): row `h*hd + 2i + j` in the file is row `h*hd + j*hd/2 + i` in HF.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Applies llama.cpp's q/k row permutation (the inverse of [`unpermute_rows`]).
pub fn permute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * hd + 2 * i + j;
                let src = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            gguf_to_hf_name("blk.12.ffn_down.weight").unwrap(),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(
            gguf_to_hf_name("blk.0.attn_q.bias").unwrap(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(gguf_to_hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(gguf_to_hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn permutation_round_trips() {
        let (rows, cols, heads) = (12, 3, 3);
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute_rows(&data, rows, cols, heads);
        assert_ne!(p, data);
        assert_eq!(unpermute_rows(&p, rows, cols, heads), data);
        // Head 0 (hd 4): HF rows [0,1 | 2,3] interleave to [0,2,1,3].
        assert_eq!(
            &p[..cols * 4],
            &[0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.]
        );
    }
}
