//! Hugging Face folders: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped, tensors converted to f32 one at a time.
//! Also a streaming safetensors writer that never holds more than one tensor.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
/// The safetensors dtype of a stored tensor ([`StEntry::dtype`]).
pub use safetensors::Dtype;
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};

/// One memory-mapped shard and its validated tensor table.
struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// name -> (dtype, shape, absolute byte range)
    tensors: BTreeMap<String, (Dtype, Vec<usize>, usize, usize)>,
}

/// Where a tensor lives.
#[derive(Debug, Clone)]
pub struct StEntry {
    /// Storage dtype.
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

/// The weights of an HF folder, across one or more shards.
pub struct SafetensorsSet {
    shards: Vec<Shard>,
    index: BTreeMap<String, StEntry>,
}

impl std::fmt::Debug for SafetensorsSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSet")
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only map of a file this process does not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    if mmap.len() >= 8 {
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
        if n > mmap.len() as u64 - 8 {
            return Err(ModelError::format(
                path,
                format!(
                    "safetensors header length {n} runs past the end of the {}-byte file",
                    mmap.len()
                ),
            ));
        }
    }
    let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        let msg = match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => data_extent_problem(&mmap),
            e => format!("invalid safetensors file: {e}"),
        };
        ModelError::format(path, msg)
    })?;
    let base = 8 + n;
    let mut tensors = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        tensors.insert(name, (info.dtype, info.shape.clone(), base + s, base + e));
    }
    Ok(Shard {
        path: path.into(),
        mmap,
        tensors,
    })
}

/// Says how the header's data offsets disagree with the file size (the safetensors crate
/// only says "incomplete metadata"). Called after the header length was checked and the
/// header validated, so it parses.
fn data_extent_problem(buf: &[u8]) -> String {
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&buf[8..8 + n]).unwrap_or_default();
    let end = header
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0)
        .saturating_add(8 + n as u64);
    let len = buf.len() as u64;
    if end > len {
        format!(
            "tensor data runs past the end of the file: the header places data up to byte {end}, the file has {len} bytes"
        )
    } else {
        format!(
            "{} bytes after the last tensor's data (byte {end}) are not described by the header",
            len - end
        )
    }
}

impl SafetensorsSet {
    /// Opens the weights of the HF folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index_path, "missing `weight_map`"))?;
            let mut files: Vec<String> = Vec::new();
            for f in map.values() {
                let f = f
                    .as_str()
                    .ok_or_else(|| ModelError::format(&index_path, "non-string shard name"))?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(ModelError::format(
                        &index_path,
                        format!("shard name `{f}` must be a plain file name"),
                    ));
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::format(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (si, f) in files.iter().enumerate() {
            let shard = open_shard(f)?;
            for (name, (dtype, shape, s, e)) in &shard.tensors {
                let entry = StEntry {
                    dtype: *dtype,
                    shape: shape.clone(),
                    shard: si,
                    start: *s,
                    end: *e,
                };
                if index.insert(name.clone(), entry).is_some() {
                    return Err(ModelError::format(
                        f,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Self { shards, index })
    }

    /// Tensor table by name.
    pub fn entries(&self) -> &BTreeMap<String, StEntry> {
        &self.index
    }

    /// The shard files.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Bytes of all shard files.
    pub fn bytes_on_disk(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    /// Reads a tensor as f32 and lets the kernel drop its pages.
    pub fn read_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        use rayon::prelude::*;
        let Some(e) = self.index.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[e.shard];
        let bytes = &shard.mmap[e.start..e.end];
        let numel: usize = e.shape.iter().product();
        let mut out = vec![0f32; numel];
        match e.dtype {
            Dtype::F32 => out
                .par_iter_mut()
                .zip(bytes.par_chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 => out
                .par_iter_mut()
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::BF16 => out
                .par_iter_mut()
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: shard.path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                });
            }
        }
        crate::release_pages(&shard.mmap, e.start, e.end - e.start);
        Ok(Some((out, e.shape.clone())))
    }

    /// Lends the stored little-endian bytes of `name` (in its [`StEntry::dtype`]) to `f`, then
    /// lets the kernel drop their pages: for copying tensors bit-exactly without converting them.
    pub fn with_bytes<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let e = self.index.get(name)?;
        let shard = &self.shards[e.shard];
        let r = f(&shard.mmap[e.start..e.end]);
        crate::release_pages(&shard.mmap, e.start, e.end - e.start);
        Some(r)
    }

    /// The path of the shard holding `name`.
    pub fn shard_path(&self, name: &str) -> Option<&Path> {
        self.index
            .get(name)
            .map(|e| self.shards[e.shard].path.as_path())
    }
}

/// Storage dtypes the writer can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl StoreDtype {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Self::F32),
            "f16" | "float16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }
    /// The `torch_dtype` string HF uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }
    /// Encodes f32 values in this dtype (round to nearest even).
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        use rayon::prelude::*;
        let mut out = vec![0u8; data.len() * self.size()];
        match self {
            Self::F32 => out
                .par_chunks_exact_mut(4)
                .zip(data)
                .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
            Self::F16 => out
                .par_chunks_exact_mut(2)
                .zip(data)
                .for_each(|(o, v)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
            Self::BF16 => out
                .par_chunks_exact_mut(2)
                .zip(data)
                .for_each(|(o, v)| o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        out
    }
}

/// Dtype of a tensor in a [`StreamingWriter`] plan: a float encoded from f32 values, or an
/// integer type whose little-endian bytes the caller supplies ([`StreamingWriter::write_next_raw`]).
/// A float tensor may be supplied as raw bytes too, to copy stored values bit-exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanDtype {
    /// A float dtype, written from f32 values.
    Float(StoreDtype),
    /// 8-bit unsigned integer (e.g. packed bitmasks).
    U8,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
}

impl From<StoreDtype> for PlanDtype {
    fn from(d: StoreDtype) -> Self {
        Self::Float(d)
    }
}

impl PlanDtype {
    fn name(self) -> &'static str {
        match self {
            Self::Float(d) => d.name(),
            Self::U8 => "U8",
            Self::I32 => "I32",
            Self::I64 => "I64",
        }
    }
    fn size(self) -> usize {
        match self {
            Self::Float(d) => d.size(),
            Self::U8 => 1,
            Self::I32 => 4,
            Self::I64 => 8,
        }
    }
}

/// Writes a safetensors file one tensor at a time: the header is computed from the names
/// and shapes up front, then each tensor's bytes are produced and written in turn.
/// Hand-written because the safetensors crate's writer needs every tensor's bytes available
/// through its `View` trait at once, which would hold a 7B model in memory.
pub struct StreamingWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    plan: Vec<(String, Vec<usize>, PlanDtype)>,
    next: usize,
}

impl StreamingWriter {
    /// Creates `path` and writes the header for `plan` (name, shape, dtype) in that order.
    pub fn create(
        path: &Path,
        plan: Vec<(String, Vec<usize>, StoreDtype)>,
        meta: &BTreeMap<String, String>,
    ) -> Result<Self> {
        Self::create_with(
            path,
            plan.into_iter().map(|(n, s, d)| (n, s, d.into())).collect(),
            meta,
        )
    }

    /// Like [`Self::create`], with integer tensors in the plan too.
    pub fn create_with(
        path: &Path,
        plan: Vec<(String, Vec<usize>, PlanDtype)>,
        meta: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !meta.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(meta).expect("strings"),
            );
        }
        let mut off = 0usize;
        for (name, shape, dt) in &plan {
            let n = shape.iter().product::<usize>() * dt.size();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dt.name(), "shape": shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let mut text = serde_json::to_string(&header).expect("serializable");
        // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
        while !(8 + text.len()).is_multiple_of(8) {
            text.push(' ');
        }
        let file = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        file.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(|e| ModelError::io(path, e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| ModelError::io(path, e))?;
        Ok(Self {
            file,
            path: path.into(),
            plan,
            next: 0,
        })
    }

    /// Writes the next tensor of the plan; `name` and the element count must match it.
    pub fn write_next(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let Some((pname, shape, dt)) = self.plan.get(self.next) else {
            return Err(ModelError::format(
                &self.path,
                format!("tensor `{name}` is not in the plan"),
            ));
        };
        if pname != name || shape.iter().product::<usize>() != data.len() {
            return Err(ModelError::format(
                &self.path,
                format!("tensor `{name}` written out of order or with wrong size"),
            ));
        }
        let PlanDtype::Float(dt) = *dt else {
            return Err(ModelError::format(
                &self.path,
                format!("tensor `{name}` is {}, not a float", dt.name()),
            ));
        };
        let bytes = dt.encode(data);
        self.file
            .write_all(&bytes)
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Writes the next tensor of the plan from its little-endian bytes in the planned dtype.
    pub fn write_next_raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some((pname, shape, dt)) = self.plan.get(self.next) else {
            return Err(ModelError::format(
                &self.path,
                format!("tensor `{name}` is not in the plan"),
            ));
        };
        if pname != name || shape.iter().product::<usize>() * dt.size() != bytes.len() {
            return Err(ModelError::format(
                &self.path,
                format!("tensor `{name}` written out of order or with wrong size"),
            ));
        }
        self.file
            .write_all(bytes)
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and closes; errors if tensors of the plan were not written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(ModelError::format(
                &self.path,
                format!("only {} of {} tensors written", self.next, self.plan.len()),
            ));
        }
        self.file
            .flush()
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(())
    }
}
