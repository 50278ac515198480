//! GGUF reading: a bounds-checked parse of the header, metadata and tensor infos (see
//! `header.rs`), and dequantization of tensors to f32 with llama.cpp's q/k row permutation undone
//! so the weights are in Hugging Face's layout.

pub mod blocks;
mod header;
pub mod writer;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;

use crate::config::Config;
use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};
use blocks::*;
use writer::MetaValue;

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
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
    IQ4_NL,
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
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            30 => BF16,
            20 => IQ4_NL,
            9 => Other(9, "Q8_1"),
            10 => Other(10, "Q2_K"),
            15 => Other(15, "Q8_K"),
            16 => Other(16, "IQ2_XXS"),
            17 => Other(17, "IQ2_XS"),
            18 => Other(18, "IQ3_XXS"),
            19 => Other(19, "IQ1_S"),
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
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            BF16 => 30,
            IQ4_NL => 20,
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
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            BF16 => "BF16",
            IQ4_NL => "IQ4_NL",
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
            IQ4_NL => (QK, std::mem::size_of::<BlockIQ4NL>()),
            Q4_1 => (QK, std::mem::size_of::<BlockQ4_1>()),
            Q5_0 => (QK, std::mem::size_of::<BlockQ5_0>()),
            Q5_1 => (QK, std::mem::size_of::<BlockQ5_1>()),
            Q3_K => (QK_K, std::mem::size_of::<BlockQ3K>()),
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
        GgmlType::IQ4_NL => dequantize_blocks::<BlockIQ4NL>(bytes, out),
        GgmlType::Q4_1 => dequantize_blocks::<BlockQ4_1>(bytes, out),
        GgmlType::Q5_0 => dequantize_blocks::<BlockQ5_0>(bytes, out),
        GgmlType::Q5_1 => dequantize_blocks::<BlockQ5_1>(bytes, out),
        GgmlType::Q3_K => dequantize_blocks::<BlockQ3K>(bytes, out),
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

/// A metadata value of an open GGUF file. Scalars and strings are copied out of the file;
/// arrays stay in its memory map and are read through [`GgufFile::array`], so a vocabulary
/// of 150k tokens costs nothing until it is used.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// A scalar or a string (never [`MetaValue::Array`]).
    Scalar(MetaValue),
    /// An array, left in the file.
    Array {
        /// GGUF type id of the items.
        item: u32,
        /// Number of items.
        len: usize,
        /// First byte of the items in the file.
        start: usize,
        /// End of the items in the file.
        end: usize,
    },
}

impl GgufValue {
    /// The GGUF type's name (`u32`, `string`, `array`...), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::Scalar(v) => header::type_name(v.type_id()),
            GgufValue::Array { .. } => "array",
        }
    }
}

/// Whether a metadata value has one of GGUF's integer types.
fn is_integer(v: &MetaValue) -> bool {
    use MetaValue::*;
    matches!(
        v,
        U8(_) | I8(_) | U16(_) | I16(_) | U32(_) | I32(_) | U64(_) | I64(_)
    )
}

/// A number of any GGUF numeric type as f64 (NaN and infinities kept).
fn as_number(v: &MetaValue) -> Option<f64> {
    use MetaValue::*;
    Some(match *v {
        U8(x) => x as f64,
        I8(x) => x as f64,
        U16(x) => x as f64,
        I16(x) => x as f64,
        U32(x) => x as f64,
        I32(x) => x as f64,
        U64(x) => x as f64,
        I64(x) => x as f64,
        F32(x) => x as f64,
        F64(x) => x,
        _ => return None,
    })
}

/// A metadata value for a message.
fn show_value(v: &MetaValue) -> String {
    use MetaValue::*;
    match v {
        Str(s) => format!("\"{}\"", clip(s, MAX_NAME_CHARS)),
        Bool(b) => b.to_string(),
        Array(_) => "an array".into(),
        I8(_) | I16(_) | I32(_) | I64(_) => v.as_u64().map_or_else(
            || as_number(v).unwrap_or(0.0).to_string(),
            |u| u.to_string(),
        ),
        F32(x) => x.to_string(),
        F64(x) => x.to_string(),
        _ => v.as_u64().unwrap_or(0).to_string(),
    }
}

/// The items of a metadata array, read from the file's map on demand.
#[derive(Debug, Clone, Copy)]
pub struct MetaArrayRef<'a> {
    item: u32,
    len: usize,
    bytes: &'a [u8],
}

impl<'a> MetaArrayRef<'a> {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the array has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// GGUF type id of the items.
    pub fn item_type(&self) -> u32 {
        self.item
    }
    /// The items of a string array (invalid UTF-8 replaced), `None` for other item types.
    pub fn strings(self) -> Option<impl Iterator<Item = Cow<'a, str>> + 'a> {
        if self.item != writer::vt::STR {
            return None;
        }
        let mut rest = self.bytes;
        // The parser checked every length against the bytes, so `get` never fails here.
        Some((0..self.len).map_while(move |_| {
            let n = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let s = rest.get(8..8usize.checked_add(usize::try_from(n).ok()?)?)?;
            rest = &rest[8 + s.len()..];
            Some(String::from_utf8_lossy(s))
        }))
    }
    /// The items of a numeric array as scalars, `None` for strings.
    fn scalars(self) -> Option<impl Iterator<Item = MetaValue> + 'a> {
        let item = self.item;
        let sz = header::scalar_size(item)? as usize;
        Some(self.bytes.chunks_exact(sz).map(move |b| {
            use writer::vt;
            let a = |n: usize| -> [u8; 8] {
                let mut x = [0u8; 8];
                x[..n].copy_from_slice(&b[..n]);
                x
            };
            match item {
                vt::U8 => MetaValue::U8(b[0]),
                vt::I8 => MetaValue::I8(b[0] as i8),
                vt::BOOL => MetaValue::Bool(b[0] != 0),
                vt::U16 => MetaValue::U16(u16::from_le_bytes([b[0], b[1]])),
                vt::I16 => MetaValue::I16(i16::from_le_bytes([b[0], b[1]])),
                vt::U32 => MetaValue::U32(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                vt::I32 => MetaValue::I32(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                vt::F32 => MetaValue::F32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                vt::U64 => MetaValue::U64(u64::from_le_bytes(a(8))),
                vt::I64 => MetaValue::I64(i64::from_le_bytes(a(8))),
                _ => MetaValue::F64(f64::from_le_bytes(a(8))),
            }
        }))
    }
    /// The items of an integer array as i64 (u64 items above `i64::MAX` become `i64::MAX`),
    /// `None` for other item types.
    pub fn ints(self) -> Option<impl Iterator<Item = i64> + 'a> {
        let it = self.scalars()?;
        let ok = matches!(
            self.item,
            writer::vt::U8
                | writer::vt::I8
                | writer::vt::U16
                | writer::vt::I16
                | writer::vt::U32
                | writer::vt::I32
                | writer::vt::U64
                | writer::vt::I64
        );
        ok.then(|| {
            it.map(|v| match v {
                MetaValue::U64(x) => i64::try_from(x).unwrap_or(i64::MAX),
                MetaValue::I64(x) => x,
                other => as_number(&other).unwrap_or(0.0) as i64,
            })
        })
    }
    /// The items of a numeric array as f64, `None` for strings and booleans.
    pub fn floats(self) -> Option<impl Iterator<Item = f64> + 'a> {
        if self.item == writer::vt::BOOL {
            return None;
        }
        Some(self.scalars()?.map(|v| as_number(&v).unwrap_or(0.0)))
    }
    /// Every item as a JSON value (non-finite floats become null, as in serde_json).
    fn to_json(self) -> Vec<Value> {
        if let Some(s) = self.strings() {
            return s.map(|s| Value::String(s.into_owned())).collect();
        }
        self.scalars()
            .into_iter()
            .flatten()
            .map(|v| match v {
                MetaValue::Bool(b) => Value::Bool(b),
                MetaValue::U64(x) => Value::from(x),
                MetaValue::I64(x) => Value::from(x),
                MetaValue::F32(x) => Value::from(x),
                MetaValue::F64(x) => Value::from(x),
                other => Value::from(as_number(&other).unwrap_or(0.0) as i64),
            })
            .collect()
    }
}

/// An open GGUF file: metadata, tensor table and the memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    metadata: BTreeMap<String, GgufValue>,
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

/// `general.alignment`: 32 when absent, else a positive power of two of an integer type.
fn alignment(meta: &BTreeMap<String, GgufValue>, path: &Path) -> Result<usize> {
    const KEY: &str = "general.alignment";
    let Some(v) = meta.get(KEY) else {
        return Ok(writer::DEFAULT_ALIGNMENT as usize);
    };
    let bad = |what: String| {
        ModelError::config(
            path,
            format!(
                "metadata key `{KEY}` {what}, expected a positive power of two of an integer type"
            ),
        )
    };
    match v {
        GgufValue::Scalar(m) if is_integer(m) => match m.as_u64() {
            Some(a) if a.is_power_of_two() && a <= usize::MAX as u64 => Ok(a as usize),
            _ => Err(bad(format!("is {}", show_value(m)))),
        },
        other => Err(bad(format!("has type {}", other.type_name()))),
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file; every count, length, dimension and offset is checked
    /// against the file size before anything is allocated or looped over from it.
    pub fn open(path: &Path) -> Result<Self> {
        // Opening a FIFO blocks and a device has no size: only regular files are read.
        crate::io::check_regular(path, u64::MAX)?;
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only and the file is not modified by this process; a
        // concurrent writer would be a user error that can at worst corrupt values read.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let header = header::parse(&mmap, path)?;
        let file_len = mmap.len();
        let alignment = alignment(&header.metadata, path)?;
        let data_offset = header
            .end
            .checked_next_multiple_of(alignment)
            .filter(|&d| d <= file_len || header.infos.is_empty())
            .ok_or_else(|| {
                ModelError::format(
                    path,
                    format!(
                        "the tensor data would start past the end of the {file_len}-byte file (header end {} aligned to {alignment})",
                        header.end
                    ),
                )
            })?;
        let mut tensors = Vec::with_capacity(header.infos.len());
        for t in header.infos {
            let name = clip(&t.name, MAX_NAME_CHARS).into_owned();
            let ty = GgmlType::from_id(t.ty).expect("the parser refuses unknown type ids");
            let (blk, bsz) = ty
                .block_layout()
                .ok_or_else(|| ModelError::UnsupportedDtype {
                    path: path.into(),
                    tensor: name.clone(),
                    dtype: ty.name().into(),
                })?;
            let numel = t.ne.iter().product::<u64>() as usize;
            let row = t.ne.first().copied().unwrap_or(1) as usize;
            if !row.is_multiple_of(blk) {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensor `{name}`: row length {row} is not a multiple of the {} block size {blk}",
                        ty.name()
                    ),
                ));
            }
            let nbytes = (numel / blk).checked_mul(bsz).ok_or_else(|| {
                ModelError::format(path, format!("tensor `{name}`: byte size overflows"))
            })?;
            let rel = usize::try_from(t.offset).unwrap_or(usize::MAX);
            let offset = data_offset.checked_add(rel);
            let end = offset.and_then(|o| o.checked_add(nbytes));
            let o = match (offset, end) {
                (Some(o), Some(e)) if e <= file_len => o,
                _ => {
                    return Err(ModelError::format(
                        path,
                        format!(
                            "tensor `{name}` claims {nbytes} bytes at data offset {} but the file has only {file_len} bytes",
                            t.offset
                        ),
                    ));
                }
            };
            // A tensor of no values passes the size checks whatever its dimensions, but they
            // are loop bounds downstream (row loops, the q/k un-permutation): none may exceed
            // the values the file could hold.
            let most = ((file_len / bsz) as u64).saturating_mul(blk as u64).max(1);
            if numel == 0
                && let Some(&d) = t.ne.iter().find(|&&d| d > most)
            {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensor `{name}`: dimension {d} is more than the {most} {} values a {file_len}-byte file can hold",
                        ty.name()
                    ),
                ));
            }
            if o % alignment != 0 {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{name}`: offset {o} is not aligned to {alignment}"),
                ));
            }
            tensors.push(GgufTensor {
                name: t.name,
                ty,
                shape: t.ne.iter().rev().map(|&d| d as usize).collect(),
                offset: o,
                nbytes,
            });
        }
        let mut by_offset: Vec<&GgufTensor> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].nbytes > w[1].offset {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensors `{}` and `{}` overlap",
                        clip(&w[0].name, MAX_NAME_CHARS),
                        clip(&w[1].name, MAX_NAME_CHARS)
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.into(),
            mmap,
            metadata: header.metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// All metadata key/values (arrays as references into the file: see [`Self::array`]).
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
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

    fn scalar(&self, key: &str) -> Option<&MetaValue> {
        match self.metadata.get(key)? {
            GgufValue::Scalar(v) => Some(v),
            GgufValue::Array { .. } => None,
        }
    }
    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.scalar(key).and_then(|v| v.as_str())
    }
    /// An integer metadata value that is not negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.scalar(key).and_then(|v| v.as_u64())
    }
    /// A numeric metadata value of any type, as f64 (NaN and infinities kept).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.scalar(key).and_then(as_number)
    }
    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.scalar(key)? {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// An array metadata value, its items read from the file on demand.
    pub fn array(&self, key: &str) -> Option<MetaArrayRef<'_>> {
        match *self.metadata.get(key)? {
            GgufValue::Array {
                item,
                len,
                start,
                end,
            } => Some(MetaArrayRef {
                item,
                len,
                bytes: &self.mmap[start..end],
            }),
            GgufValue::Scalar(_) => None,
        }
    }
    /// An array metadata value as JSON values (allocates one per item; [`Self::array`]
    /// reads the items without copying them).
    pub fn get_array(&self, key: &str) -> Option<Vec<Value>> {
        self.array(key).map(MetaArrayRef::to_json)
    }

    fn wrong_type(&self, key: &str, want: &str) -> ModelError {
        let found = self.metadata.get(key).map_or("none", GgufValue::type_name);
        ModelError::config(
            &self.path,
            format!("metadata key `{key}` has type {found}, expected {want}"),
        )
    }
    /// A non-negative integer metadata value: `Ok(None)` when absent, an error naming the key
    /// when it has another type or is negative.
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Scalar(v)) if is_integer(v) => v.as_u64().map(Some).ok_or_else(|| {
                ModelError::config(
                    &self.path,
                    format!(
                        "metadata key `{key}` is {}, expected a non-negative integer",
                        show_value(v)
                    ),
                )
            }),
            Some(_) => Err(self.wrong_type(key, "an integer")),
        }
    }
    /// A numeric metadata value of any integer or float type (NaN and infinities kept, for
    /// the caller to judge): `Ok(None)` when absent, an error naming the key for other types.
    pub fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Scalar(v)) if as_number(v).is_some() => Ok(as_number(v)),
            Some(_) => Err(self.wrong_type(key, "a number")),
        }
    }
    /// A string metadata value: `Ok(None)` when absent, an error naming the key for other
    /// types.
    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Scalar(MetaValue::Str(s))) => Ok(Some(s)),
            Some(_) => Err(self.wrong_type(key, "a string")),
        }
    }

    /// The architecture (`general.architecture`).
    pub fn arch(&self) -> Result<&str> {
        self.string("general.architecture")?.ok_or_else(|| {
            ModelError::config(&self.path, "missing metadata key `general.architecture`")
        })
    }

    /// Builds the HF-style config from `{arch}.*` metadata. A key present with a wrong type
    /// or an invalid value (a NaN epsilon, a negative RoPE base) is an error naming it, never
    /// replaced by a default.
    pub fn config(&self) -> Result<Config> {
        let arch = self.arch()?;
        let model_type = match arch {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            other => {
                return Err(ModelError::config(
                    &self.path,
                    format!(
                        "unknown general.architecture `{}` (known: llama, mistral, qwen2)",
                        clip(other, MAX_NAME_CHARS)
                    ),
                ));
            }
        };
        let invalid = |key: &str, v: f64, want: &str| {
            ModelError::config(
                &self.path,
                format!("metadata key `{key}` = {v} is invalid (must be {want})"),
            )
        };
        // A count: a non-negative integer, in Config::validate's range when present.
        let count = |k: &str| -> Result<Option<usize>> {
            let key = format!("{arch}.{k}");
            match self.uint(&key)? {
                Some(v) if v == 0 || v > 1 << 24 => Err(ModelError::config(
                    &self.path,
                    format!("metadata key `{key}` = {v} is out of range (1 to 2^24)"),
                )),
                v => Ok(v.map(|v| v as usize)),
            }
        };
        let need = |k: &str| -> Result<usize> {
            count(k)?.ok_or_else(|| {
                ModelError::config(&self.path, format!("missing metadata key `{arch}.{k}`"))
            })
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv = count("attention.head_count_kv")?;
        let vocab = match count("vocab_size")? {
            Some(v) => Some(v),
            None => match self.array("tokenizer.ggml.tokens") {
                Some(a) => Some(a.len()),
                None => self
                    .tensor("token_embd.weight")
                    .and_then(|t| t.shape.first().copied()),
            },
        }
        .ok_or_else(|| ModelError::config(&self.path, "cannot tell the vocabulary size"))?;
        let head_dim = self
            .uint(&format!("{arch}.attention.key_length"))?
            .map(|v| v as usize)
            .filter(|&d| heads > 0 && d != hidden / heads);
        let scaling_key = format!("{arch}.rope.scaling.type");
        if let Some(t) = self.string(&scaling_key)?
            && t != "none"
        {
            return Err(ModelError::config(
                &self.path,
                format!(
                    "rope scaling `{}` (`{scaling_key}`) in GGUF is not supported",
                    clip(t, MAX_NAME_CHARS)
                ),
            ));
        }
        let eps_key = format!("{arch}.attention.layer_norm_rms_epsilon");
        let rms_norm_eps = match self.number(&eps_key)? {
            Some(e) if e.is_finite() && e > 0.0 && e < 1.0 => e,
            Some(e) => return Err(invalid(&eps_key, e, "a finite number in (0, 1)")),
            None => {
                return Err(ModelError::config(
                    &self.path,
                    format!("missing metadata key `{eps_key}`"),
                ));
            }
        };
        let theta_key = format!("{arch}.rope.freq_base");
        let rope_theta = match self.number(&theta_key)? {
            Some(t) if t.is_finite() && t > 1.0 => t,
            Some(t) => return Err(invalid(&theta_key, t, "a finite number above 1")),
            None => 10_000.0,
        };
        let tok_id = |k: &str| -> Result<Option<crate::config::TokenIds>> {
            match self.uint(k)? {
                None => Ok(None),
                Some(v) => u32::try_from(v)
                    .map(|v| Some(crate::config::TokenIds::One(v)))
                    .map_err(|_| {
                        ModelError::config(
                            &self.path,
                            format!("metadata key `{k}` = {v} is not a token id (above 2^32)"),
                        )
                    }),
            }
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
            max_position_embeddings: self.uint(&format!("{arch}.context_length"))?.ok_or_else(
                || {
                    ModelError::config(
                        &self.path,
                        format!("missing metadata key `{arch}.context_length`"),
                    )
                },
            )? as usize,
            rms_norm_eps,
            rope_theta,
            rope_scaling: None,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            attention_bias: model_type == "llama" && self.tensor("blk.0.attn_q.bias").is_some(),
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id")?,
            torch_dtype: Some("float32".into()),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// The metadata key a config field was read from, for messages about it.
    pub fn config_key(&self, field: &str) -> String {
        let arch = self.get_str("general.architecture").unwrap_or("llama");
        let k = match field {
            "num_hidden_layers" => "block_count",
            "hidden_size" => "embedding_length",
            "intermediate_size" => "feed_forward_length",
            "num_attention_heads" => "attention.head_count",
            "num_key_value_heads" => "attention.head_count_kv",
            "vocab_size" if self.metadata.contains_key(&format!("{arch}.vocab_size")) => {
                "vocab_size"
            }
            "vocab_size" if self.array("tokenizer.ggml.tokens").is_some() => {
                return "tokenizer.ggml.tokens".into();
            }
            "vocab_size" => return "token_embd.weight".into(),
            other => return other.into(),
        };
        format!("{arch}.{k}")
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
pub fn permute_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Vec<T> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
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
