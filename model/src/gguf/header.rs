//! The GGUF header parser: magic, version, metadata key/values and tensor infos, read from
//! the memory map. Every count, length and dimension is checked against the bytes that
//! remain before it drives a loop or an allocation, and what the parsed header takes in
//! memory is charged to a [`Budget`] of the file's size plus a fixed margin, so no file can
//! make the reader allocate more than it holds. Metadata arrays are not copied: they stay in
//! the map and are read through [`super::MetaArrayRef`].
//!
//! Hand-written because gguf-rs (used before) trusts claimed lengths and counts, keeps the
//! last of duplicate keys, turns NaN into null and reaches `unreachable!` on some type ids.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::GgufValue;
use super::writer::{MetaValue, vt};
use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};
use crate::io::Budget;

/// The name of a metadata value type, for messages.
pub(crate) fn type_name(ty: u32) -> &'static str {
    match ty {
        vt::U8 => "u8",
        vt::I8 => "i8",
        vt::U16 => "u16",
        vt::I16 => "i16",
        vt::U32 => "u32",
        vt::I32 => "i32",
        vt::F32 => "f32",
        vt::BOOL => "bool",
        vt::STR => "string",
        vt::ARRAY => "array",
        vt::U64 => "u64",
        vt::I64 => "i64",
        vt::F64 => "f64",
        _ => "unknown",
    }
}

/// Fixed byte size of a scalar metadata value type, `None` for strings and arrays.
pub(crate) fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        vt::U8 | vt::I8 | vt::BOOL => Some(1),
        vt::U16 | vt::I16 => Some(2),
        vt::U32 | vt::I32 | vt::F32 => Some(4),
        vt::U64 | vt::I64 | vt::F64 => Some(8),
        _ => None,
    }
}

/// The fewest bytes one key/value takes: key length, an empty key, type, one value byte.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes one tensor info takes: name length, dimension count, type, offset.
const MIN_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Memory charged per key/value beyond its key and value bytes (map node share, allocator
/// overhead), and per item of a string array beyond its bytes (a `String` when read).
const KV_OVERHEAD: u64 = 96;
const STR_ITEM_OVERHEAD: u64 = 24;
/// Memory charged per tensor info beyond its name and dimensions: the tensor's entries in
/// the reader's tables (`GgufTensor`, the HF-name map), and the allocator's overhead.
const INFO_OVERHEAD: u64 = 256;

/// A tensor info as stored.
pub(super) struct Info {
    /// Name (lossy UTF-8).
    pub name: String,
    /// GGUF `ne`, innermost dimension first.
    pub ne: Vec<u64>,
    /// GGML type id (known: checked).
    pub ty: u32,
    /// Offset relative to the data section.
    pub offset: u64,
}

/// A parsed header.
pub(super) struct Header {
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub infos: Vec<Info>,
    /// Byte just after the tensor infos (the data section starts at the next alignment).
    pub end: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn error(&self, what: &str) -> ModelError {
        ModelError::format(
            self.path,
            format!(
                "truncated or corrupt GGUF header: {what} at byte {} of {}",
                self.pos,
                self.buf.len()
            ),
        )
    }
    fn take(&mut self, n: u64, what: impl Fn() -> String) -> Result<&'a [u8]> {
        let remaining = self.remaining();
        if n > remaining {
            return Err(self.error(&format!("{} needs {n} bytes, {remaining} remain", what())));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }
    fn array<const N: usize>(&mut self, what: impl Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: impl Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: impl Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: impl Fn() -> String) -> Result<&'a [u8]> {
        let n = self.u64(&what)?;
        self.take(n, what)
    }
    /// Checks that `count` items of at least `min` bytes each fit in what remains.
    fn room(&self, count: u64, min: u64, what: &str) -> Result<usize> {
        let remaining = self.remaining();
        if count.checked_mul(min).is_none_or(|b| b > remaining) {
            return Err(self.error(&format!(
                "{what} {count} needs at least {min} bytes each, {remaining} remain"
            )));
        }
        Ok(count as usize)
    }
    fn scalar(&mut self, ty: u32, what: impl Fn() -> String) -> Result<MetaValue> {
        Ok(match ty {
            vt::U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            vt::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            vt::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            vt::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            vt::U32 => MetaValue::U32(self.u32(what)?),
            vt::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            vt::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            vt::BOOL => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            vt::U64 => MetaValue::U64(self.u64(what)?),
            vt::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            vt::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            vt::STR => MetaValue::Str(lossy(self.string(what)?)),
            t => unreachable!("scalar type {t} is checked by the caller"),
        })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses the header of `buf` (the whole file).
pub(super) fn parse(buf: &[u8], path: &Path) -> Result<Header> {
    if buf.len() < 4 || &buf[..4] != b"GGUF" {
        return Err(ModelError::format(path, "not a GGUF file (bad magic)"));
    }
    let mut c = Cursor { buf, pos: 4, path };
    let mut budget = Budget::for_file(buf.len() as u64);
    let version = c.u32(|| "version".into())?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::format(
            path,
            format!("unsupported GGUF version {version} (2 and 3 are)"),
        ));
    }
    let n_tensors = c.u64(|| "tensor count".into())?;
    let n_kv = c.u64(|| "metadata count".into())?;
    // Counts first: neither loop may run longer than the file could describe.
    c.room(n_kv, MIN_KV_BYTES, "metadata count")?;
    let limit = budget.limit();
    let over = |what: String| {
        ModelError::format(
            path,
            format!(
                "{what}: the parsed header would take more than {limit} bytes of memory (the file's size plus 1 MiB), so the file is refused"
            ),
        )
    };

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = lossy(c.string(|| format!("metadata key {i}"))?);
        let shown = || format!("metadata key `{}`", clip(&key, MAX_NAME_CHARS));
        let ty = c.u32(|| format!("{}: value type", shown()))?;
        let mut cost = KV_OVERHEAD + key.len() as u64;
        let value = if ty == vt::ARRAY {
            let item = c.u32(|| format!("{}: array item type", shown()))?;
            let len = c.u64(|| format!("{}: array length", shown()))?;
            let start = c.pos;
            if let Some(sz) = scalar_size(item) {
                let n = c.room(len, sz, &format!("{}: array length", shown()))?;
                c.take(n as u64 * sz, shown)?;
                cost += n as u64 * sz;
            } else if item == vt::STR {
                let n = c.room(len, 8, &format!("{}: array length", shown()))?;
                for j in 0..n {
                    let s = c.string(|| format!("{} item {j}", shown()))?;
                    cost += STR_ITEM_OVERHEAD + s.len() as u64;
                }
            } else {
                return Err(ModelError::format(
                    path,
                    format!(
                        "{}: arrays of {} (type {item}) are not supported",
                        shown(),
                        type_name(item)
                    ),
                ));
            }
            GgufValue::Array {
                item,
                len: len as usize,
                start,
                end: c.pos,
            }
        } else if ty == vt::STR || scalar_size(ty).is_some() {
            let v = c.scalar(ty, shown)?;
            if let MetaValue::Str(s) = &v {
                cost += s.len() as u64;
            }
            GgufValue::Scalar(v)
        } else {
            return Err(c.error(&format!("{}: unknown value type {ty}", shown())));
        };
        if !budget.take(cost) {
            return Err(over(shown()));
        }
        let dup = format!(
            "metadata key `{}` appears twice",
            clip(&key, MAX_NAME_CHARS)
        );
        if metadata.insert(key, value).is_some() {
            return Err(ModelError::format(path, dup));
        }
    }

    let n = c.room(n_tensors, MIN_INFO_BYTES, "tensor count")?;
    if !budget.take(n as u64 * INFO_OVERHEAD) {
        return Err(over(format!("{n} tensor infos")));
    }
    let mut infos = Vec::with_capacity(n);
    for i in 0..n {
        let name = lossy(c.string(|| format!("tensor {i} name"))?);
        let shown = || format!("tensor `{}`", clip(&name, MAX_NAME_CHARS));
        let dims = c.u32(|| format!("{}: dimension count", shown()))?;
        if dims > 4 {
            return Err(c.error(&format!(
                "tensor {i} ({}) has {dims} dimensions (at most 4)",
                shown()
            )));
        }
        let mut ne = Vec::with_capacity(dims as usize);
        let mut numel: u64 = 1;
        for _ in 0..dims {
            let d = c.u64(|| format!("{}: dimension", shown()))?;
            numel = numel.checked_mul(d).ok_or_else(|| {
                c.error(&format!(
                    "tensor {i} ({}): the product of its dimensions overflows",
                    shown()
                ))
            })?;
            ne.push(d);
        }
        let ty = c.u32(|| format!("{}: type", shown()))?;
        if super::GgmlType::from_id(ty).is_none() {
            return Err(ModelError::format(
                path,
                format!("{} has unknown type id {ty}", shown()),
            ));
        }
        let offset = c.u64(|| format!("{}: offset", shown()))?;
        if !budget.take(name.len() as u64 + 8 * dims as u64) {
            return Err(over(shown()));
        }
        infos.push(Info {
            name,
            ne,
            ty,
            offset,
        });
    }
    // Duplicate names, before anything is looked up by name.
    let mut seen = HashSet::with_capacity(infos.len());
    for t in &infos {
        if !seen.insert(t.name.as_str()) {
            return Err(ModelError::format(
                path,
                format!("tensor `{}` appears twice", clip(&t.name, MAX_NAME_CHARS)),
            ));
        }
    }
    Ok(Header {
        metadata,
        infos,
        end: c.pos,
    })
}
