//! A streaming GGUF (version 3) writer, and a typed reader of a file's metadata.
//!
//! [`GgufWriter::create`] writes the header, every metadata key/value and the tensor infos
//! (with each tensor's offset computed up front from its declared type and shape, aligned to
//! `general.alignment`, 32 by default); the caller then hands over each tensor's bytes with
//! [`GgufWriter::write_tensor`] in the declared order, so only one tensor is ever in memory.
//! Writing to a temporary name and renaming it into place is the caller's job.
//!
//! Layout (all little-endian): `"GGUF"`, version u32 = 3, tensor count u64, metadata count
//! u64; each key/value as (string key, u32 value type, value); each tensor info as (string
//! name, u32 dimension count, u64 dims innermost first, u32 GGML type, u64 offset relative to
//! the data section); zero padding to the alignment; the data section, each tensor padded to
//! the alignment. A string is a u64 byte length and UTF-8 bytes; an array is a u32 item type,
//! a u64 length and the items.
//!
//! [`read_metadata`] reads the key/values back with their exact GGUF types, copied out of
//! the file (where [`super::GgufFile`] leaves arrays in its map), so a converter can copy keys
//! from one file to another unchanged.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::GgmlType;
use crate::error::{ModelError, Result};

/// Alignment of tensor data when `general.alignment` is absent (GGUF spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML's limit on tensor name length (`GGML_MAX_NAME`, including the terminating NUL).
pub const MAX_NAME_BYTES: usize = 63;

/// One metadata value with its GGUF type.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// An array of one scalar or string type (GGUF has no heterogeneous arrays; nested
    /// arrays are not written).
    Array(MetaArray),
}

/// A homogeneous metadata array.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// GGUF metadata value type ids (`enum gguf_type`), shared by the header parser.
pub(crate) mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STR: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl MetaValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => vt::U8,
            MetaValue::I8(_) => vt::I8,
            MetaValue::U16(_) => vt::U16,
            MetaValue::I16(_) => vt::I16,
            MetaValue::U32(_) => vt::U32,
            MetaValue::I32(_) => vt::I32,
            MetaValue::F32(_) => vt::F32,
            MetaValue::Bool(_) => vt::BOOL,
            MetaValue::Str(_) => vt::STR,
            MetaValue::U64(_) => vt::U64,
            MetaValue::I64(_) => vt::I64,
            MetaValue::F64(_) => vt::F64,
            MetaValue::Array(_) => vt::ARRAY,
        }
    }

    /// A string value.
    pub fn str(s: impl Into<String>) -> Self {
        MetaValue::Str(s.into())
    }

    /// The value as u64 when it is an unsigned or non-negative signed integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string slice when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            MetaValue::U8(v) => out.push(*v),
            MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::Bool(v) => out.push(*v as u8),
            MetaValue::Str(s) => put_str(out, s),
            MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
            MetaValue::Array(a) => a.encode(out),
        }
    }
}

impl MetaArray {
    /// The GGUF type id of the items.
    pub fn item_type_id(&self) -> u32 {
        match self {
            MetaArray::U8(_) => vt::U8,
            MetaArray::I8(_) => vt::I8,
            MetaArray::U16(_) => vt::U16,
            MetaArray::I16(_) => vt::I16,
            MetaArray::U32(_) => vt::U32,
            MetaArray::I32(_) => vt::I32,
            MetaArray::F32(_) => vt::F32,
            MetaArray::Bool(_) => vt::BOOL,
            MetaArray::Str(_) => vt::STR,
            MetaArray::U64(_) => vt::U64,
            MetaArray::I64(_) => vt::I64,
            MetaArray::F64(_) => vt::F64,
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::Str(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.item_type_id().to_le_bytes());
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        fn all<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], f: impl Fn(T) -> [u8; N]) {
            out.reserve(v.len() * N);
            for &x in v {
                out.extend_from_slice(&f(x));
            }
        }
        match self {
            MetaArray::U8(v) => out.extend_from_slice(v),
            MetaArray::I8(v) => all(out, v, i8::to_le_bytes),
            MetaArray::U16(v) => all(out, v, u16::to_le_bytes),
            MetaArray::I16(v) => all(out, v, i16::to_le_bytes),
            MetaArray::U32(v) => all(out, v, u32::to_le_bytes),
            MetaArray::I32(v) => all(out, v, i32::to_le_bytes),
            MetaArray::F32(v) => all(out, v, f32::to_le_bytes),
            MetaArray::Bool(v) => all(out, v, |b| [b as u8]),
            MetaArray::Str(v) => v.iter().for_each(|s| put_str(out, s)),
            MetaArray::U64(v) => all(out, v, u64::to_le_bytes),
            MetaArray::I64(v) => all(out, v, i64::to_le_bytes),
            MetaArray::F64(v) => all(out, v, f64::to_le_bytes),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A tensor to be written: GGUF name, row-major shape (outermost first, as
/// [`super::GgufTensor::shape`]) and storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDecl {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape; the last dimension is the row length that blocks run along.
    pub shape: Vec<usize>,
    /// Storage type.
    pub ty: GgmlType,
}

impl TensorDecl {
    /// Bytes of data this tensor takes, or why it cannot be stored in its type.
    pub fn nbytes(&self) -> std::result::Result<usize, String> {
        let (blk, bsz) = self
            .ty
            .block_layout()
            .ok_or_else(|| format!("type {} cannot be written", self.ty.name()))?;
        if self.shape.is_empty() || self.shape.len() > 4 {
            return Err(format!(
                "{} dimensions (1 to 4 are allowed)",
                self.shape.len()
            ));
        }
        let row = *self.shape.last().expect("non-empty");
        if !row.is_multiple_of(blk) {
            return Err(format!(
                "row length {row} is not a multiple of the {} block size {blk}",
                self.ty.name()
            ));
        }
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("dimensions {:?} overflow", self.shape))?;
        (numel / blk)
            .checked_mul(bsz)
            .ok_or_else(|| "byte size overflows".to_string())
    }
}

/// Writes one GGUF file: header and tensor infos at creation, then tensor data one tensor at
/// a time in the declared order.
pub struct GgufWriter {
    file: BufWriter<std::fs::File>,
    path: PathBuf,
    tensors: Vec<TensorDecl>,
    sizes: Vec<usize>,
    alignment: u64,
    next: usize,
    pos: u64,
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("path", &self.path)
            .field("next", &self.next)
            .finish()
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl GgufWriter {
    /// Creates `path` (truncating it) and writes the header, `metadata` in the given order and
    /// the tensor infos. `general.alignment` (u32 or u64, a positive multiple of 8) in the
    /// metadata sets the data alignment; it is not added when absent (readers assume 32).
    pub fn create(
        path: &Path,
        metadata: &[(String, MetaValue)],
        tensors: Vec<TensorDecl>,
    ) -> Result<Self> {
        let err = |m: String| ModelError::format(path, m);
        let mut keys = std::collections::HashSet::new();
        let mut alignment = DEFAULT_ALIGNMENT;
        for (k, v) in metadata {
            if !keys.insert(k.as_str()) {
                return Err(err(format!("metadata key `{k}` given twice")));
            }
            if k == "general.alignment" {
                alignment = match (v, v.as_u64()) {
                    (MetaValue::U32(_) | MetaValue::U64(_), Some(a)) if a > 0 && a % 8 == 0 => a,
                    _ => {
                        return Err(err(format!(
                            "general.alignment must be a u32 multiple of 8, got {v:?}"
                        )));
                    }
                };
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in &tensors {
            if !names.insert(t.name.as_str()) {
                return Err(err(format!("tensor `{}` declared twice", t.name)));
            }
            if t.name.len() > MAX_NAME_BYTES {
                return Err(err(format!(
                    "tensor name `{}` is longer than {MAX_NAME_BYTES} bytes",
                    t.name
                )));
            }
            sizes.push(
                t.nbytes()
                    .map_err(|m| err(format!("tensor `{}`: {m}", t.name)))?,
            );
        }

        let mut head = Vec::with_capacity(1 << 16);
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut offset = 0u64;
        for (t, &n) in tensors.iter().zip(&sizes) {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + n as u64, alignment);
        }
        let data_start = align_up(head.len() as u64, alignment);
        head.resize(data_start as usize, 0);

        let file = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&head).map_err(|e| ModelError::io(path, e))?;
        Ok(Self {
            file,
            path: path.into(),
            tensors,
            sizes,
            alignment,
            next: 0,
            pos: 0,
        })
    }

    /// The data alignment in use.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The declaration of the tensor [`Self::write_tensor`] expects next, if any.
    pub fn next_tensor(&self) -> Option<&TensorDecl> {
        self.tensors.get(self.next)
    }

    /// Writes the next declared tensor's bytes; `name` and the byte count must match the
    /// declaration.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(ModelError::format(
                &self.path,
                format!("tensor `{name}` was not declared"),
            ));
        };
        if t.name != name {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "tensor `{name}` written out of order (`{}` is next)",
                    t.name
                ),
            ));
        }
        if bytes.len() != self.sizes[self.next] {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "tensor `{name}`: {} bytes given, {} declared",
                    bytes.len(),
                    self.sizes[self.next]
                ),
            ));
        }
        let io = |e| ModelError::io(&self.path, e);
        self.file.write_all(bytes).map_err(io)?;
        let end = self.pos + bytes.len() as u64;
        let padded = align_up(end, self.alignment);
        self.file
            .write_all(&vec![0u8; (padded - end) as usize])
            .map_err(io)?;
        self.pos = padded;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs the file; errors when declared tensors were not written. Returns the
    /// file's length in bytes.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.tensors.len() {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "only {} of {} declared tensors written",
                    self.next,
                    self.tensors.len()
                ),
            ));
        }
        self.file
            .flush()
            .map_err(|e| ModelError::io(&self.path, e))?;
        let f = self.file.get_ref();
        f.sync_all().map_err(|e| ModelError::io(&self.path, e))?;
        Ok(f.metadata()
            .map_err(|e| ModelError::io(&self.path, e))?
            .len())
    }
}

/// A bounds-checked little-endian reader over a byte slice.
struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Rd<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8]> {
        let rem = (self.buf.len() - self.pos) as u64;
        if n > rem {
            return Err(ModelError::format(
                self.path,
                format!(
                    "truncated GGUF metadata: {n} bytes needed at byte {}, {rem} remain",
                    self.pos
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ModelError::format(self.path, "metadata string is not UTF-8"))
    }
    /// Checks that `n` items of at least `min` bytes each can remain, before allocating.
    fn room(&self, n: u64, min: u64) -> Result<usize> {
        let rem = (self.buf.len() - self.pos) as u64;
        match n.checked_mul(min) {
            Some(b) if b <= rem => Ok(n as usize),
            _ => Err(ModelError::format(
                self.path,
                format!("metadata array of {n} items exceeds the file"),
            )),
        }
    }
    fn scalar(&mut self, ty: u32) -> Result<MetaValue> {
        Ok(match ty {
            vt::U8 => MetaValue::U8(self.arr::<1>()?[0]),
            vt::I8 => MetaValue::I8(i8::from_le_bytes(self.arr()?)),
            vt::U16 => MetaValue::U16(u16::from_le_bytes(self.arr()?)),
            vt::I16 => MetaValue::I16(i16::from_le_bytes(self.arr()?)),
            vt::U32 => MetaValue::U32(self.u32()?),
            vt::I32 => MetaValue::I32(i32::from_le_bytes(self.arr()?)),
            vt::F32 => MetaValue::F32(f32::from_le_bytes(self.arr()?)),
            vt::BOOL => MetaValue::Bool(self.arr::<1>()?[0] != 0),
            vt::STR => MetaValue::Str(self.string()?),
            vt::U64 => MetaValue::U64(self.u64()?),
            vt::I64 => MetaValue::I64(i64::from_le_bytes(self.arr()?)),
            vt::F64 => MetaValue::F64(f64::from_le_bytes(self.arr()?)),
            t => {
                return Err(ModelError::format(
                    self.path,
                    format!("unknown metadata value type {t}"),
                ));
            }
        })
    }
    fn array(&mut self) -> Result<MetaArray> {
        let item = self.u32()?;
        let n = self.u64()?;
        macro_rules! many {
            ($variant:ident, $t:ty, $sz:expr) => {{
                let n = self.room(n, $sz)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.arr()?));
                }
                MetaArray::$variant(v)
            }};
        }
        Ok(match item {
            vt::U8 => MetaArray::U8(self.take(self.room(n, 1)? as u64)?.to_vec()),
            vt::I8 => many!(I8, i8, 1),
            vt::U16 => many!(U16, u16, 2),
            vt::I16 => many!(I16, i16, 2),
            vt::U32 => many!(U32, u32, 4),
            vt::I32 => many!(I32, i32, 4),
            vt::F32 => many!(F32, f32, 4),
            vt::BOOL => MetaArray::Bool(
                self.take(self.room(n, 1)? as u64)?
                    .iter()
                    .map(|&b| b != 0)
                    .collect(),
            ),
            vt::STR => {
                let n = self.room(n, 8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string()?);
                }
                MetaArray::Str(v)
            }
            vt::U64 => many!(U64, u64, 8),
            vt::I64 => many!(I64, i64, 8),
            vt::F64 => many!(F64, f64, 8),
            t => {
                return Err(ModelError::format(
                    self.path,
                    format!("metadata array of unsupported item type {t}"),
                ));
            }
        })
    }
}

/// Reads a GGUF file's metadata key/values in file order with their exact types. Every
/// length is checked against the file size before anything is allocated from it.
pub fn read_metadata(path: &Path) -> Result<Vec<(String, MetaValue)>> {
    crate::io::check_regular(path, u64::MAX)?;
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only map of a file this process does not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    // The reader's checks (duplicate keys, the memory budget) before anything is copied.
    super::header::parse(&mmap, path)?;
    parse_metadata(&mmap, path)
}

fn parse_metadata(buf: &[u8], path: &Path) -> Result<Vec<(String, MetaValue)>> {
    let mut r = Rd { buf, pos: 0, path };
    if r.take(4)? != b"GGUF" {
        return Err(ModelError::format(path, "not a GGUF file (bad magic)"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::format(
            path,
            format!("unsupported GGUF version {version} (2 and 3 are)"),
        ));
    }
    let _n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // Each key/value takes at least 13 bytes (key length, type, one value byte).
    let mut out = Vec::with_capacity(r.room(n_kv, 13)?);
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let v = if ty == vt::ARRAY {
            MetaValue::Array(r.array()?)
        } else {
            r.scalar(ty)?
        };
        out.push((key, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_metadata() -> Vec<(String, MetaValue)> {
        vec![
            ("general.architecture".into(), MetaValue::str("llama")),
            ("general.alignment".into(), MetaValue::U32(64)),
            ("t.u8".into(), MetaValue::U8(200)),
            ("t.i8".into(), MetaValue::I8(-5)),
            ("t.u16".into(), MetaValue::U16(60000)),
            ("t.i16".into(), MetaValue::I16(-30000)),
            ("t.u32".into(), MetaValue::U32(4_000_000_000)),
            ("t.i32".into(), MetaValue::I32(-2_000_000_000)),
            ("t.f32".into(), MetaValue::F32(1.5e-5)),
            ("t.bool".into(), MetaValue::Bool(true)),
            ("t.str".into(), MetaValue::str("héllo")),
            ("t.u64".into(), MetaValue::U64(1 << 40)),
            ("t.i64".into(), MetaValue::I64(-(1 << 40))),
            ("t.f64".into(), MetaValue::F64(0.1)),
            (
                "t.astr".into(),
                MetaValue::Array(MetaArray::Str(vec!["a".into(), "".into(), "Ġthe".into()])),
            ),
            (
                "t.ai32".into(),
                MetaValue::Array(MetaArray::I32(vec![1, -2, 3])),
            ),
            (
                "t.af32".into(),
                MetaValue::Array(MetaArray::F32(vec![0.5, -1.0])),
            ),
            (
                "t.abool".into(),
                MetaValue::Array(MetaArray::Bool(vec![true, false])),
            ),
            ("t.au8".into(), MetaValue::Array(MetaArray::U8(vec![]))),
            (
                "t.au64".into(),
                MetaValue::Array(MetaArray::U64(vec![7, 8])),
            ),
        ]
    }

    #[test]
    fn round_trips_through_both_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta = demo_metadata();
        // Q8_0 rows of 64 (2 blocks) x 3 rows, an F32 vector, an F16 matrix.
        let mut q8: Vec<u8> = (0..3 * 2 * 34).map(|i| (i % 251) as u8).collect();
        for b in q8.chunks_exact_mut(34) {
            b[0] = 0x00;
            b[1] = 0x2c; // f16 0.0625
        }
        let v: Vec<u8> = [1.0f32, -2.0, 3.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let h: Vec<u8> = (0..8)
            .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
            .collect();
        let decls = vec![
            TensorDecl {
                name: "a.weight".into(),
                shape: vec![3, 64],
                ty: GgmlType::Q8_0,
            },
            TensorDecl {
                name: "b.weight".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            TensorDecl {
                name: "c.weight".into(),
                shape: vec![2, 4],
                ty: GgmlType::F16,
            },
        ];
        let mut w = GgufWriter::create(&path, &meta, decls).unwrap();
        assert_eq!(w.alignment(), 64);
        assert!(w.write_tensor("b.weight", &v).is_err(), "out of order");
        assert!(w.write_tensor("a.weight", &q8[1..]).is_err(), "wrong size");
        w.write_tensor("a.weight", &q8).unwrap();
        w.write_tensor("b.weight", &v).unwrap();
        w.write_tensor("c.weight", &h).unwrap();
        let len = w.finish().unwrap();
        assert_eq!(len % 64, 0);

        assert_eq!(read_metadata(&path).unwrap(), meta);

        let f = crate::gguf::GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture"), Some("llama"));
        assert_eq!(f.get_u64("t.u32"), Some(4_000_000_000));
        assert_eq!(f.get_bool("t.bool"), Some(true));
        assert_eq!(f.get_str("t.str"), Some("héllo"));
        assert_eq!(f.get_array("t.astr").unwrap().len(), 3);
        let a = f.tensor("a.weight").unwrap();
        assert_eq!(
            (a.ty, a.shape.clone(), a.offset % 64),
            (GgmlType::Q8_0, vec![3, 64], 0)
        );
        assert_eq!(f.tensor_bytes(a), &q8[..]);
        let b = f.tensor("b.weight").unwrap();
        assert_eq!(f.read_f32(b), vec![1.0, -2.0, 3.5]);
        let c = f.tensor("c.weight").unwrap();
        assert_eq!(c.shape, vec![2, 4]);
        assert_eq!(f.read_f32(c), (0..8).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_bad_declarations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let bad_row = vec![TensorDecl {
            name: "x".into(),
            shape: vec![2, 48],
            ty: GgmlType::Q4_0,
        }];
        assert!(GgufWriter::create(&path, &[], bad_row).is_err());
        let dup = vec![
            TensorDecl {
                name: "x".into(),
                shape: vec![4],
                ty: GgmlType::F32,
            },
            TensorDecl {
                name: "x".into(),
                shape: vec![4],
                ty: GgmlType::F32,
            },
        ];
        assert!(GgufWriter::create(&path, &[], dup).is_err());
        let align = vec![("general.alignment".to_string(), MetaValue::U32(12))];
        assert!(GgufWriter::create(&path, &align, vec![]).is_err());
        let w = GgufWriter::create(
            &path,
            &[],
            vec![TensorDecl {
                name: "x".into(),
                shape: vec![4],
                ty: GgmlType::F32,
            }],
        )
        .unwrap();
        assert!(w.finish().is_err(), "missing tensor");
    }

    #[test]
    fn truncated_metadata_is_an_error() {
        let mut buf = b"GGUF".to_vec();
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&0u64.to_le_bytes());
        buf.extend_from_slice(&1u64.to_le_bytes());
        put_str(&mut buf, "k");
        buf.extend_from_slice(&vt::ARRAY.to_le_bytes());
        buf.extend_from_slice(&vt::STR.to_le_bytes());
        buf.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_metadata(&buf, Path::new("x")).is_err());
    }
}
