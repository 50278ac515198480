//! Hugging Face folders: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped, tensors converted to f32 one at a time.
//! Also a streaming safetensors writer that never holds more than one tensor.
//!
//! Headers are parsed here as a stream rather than by the safetensors crate, which buffers
//! the whole JSON as a tree, keeps the last of duplicate names and quotes file content in its
//! errors: entries are checked as they are read (dtype, at most [`MAX_DIMS`] dimensions, no
//! duplicates) and charged to a memory budget of the file's size plus a fixed margin
//! ([`crate::io::PARSE_MARGIN`]), so a header of a million empty tensors is refused early.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
/// The safetensors dtype of a stored tensor ([`StEntry::dtype`]).
pub use safetensors::Dtype;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};
use crate::io::Budget;

/// A shard's tensors: name -> (dtype, shape, absolute byte range).
type ShardTable = BTreeMap<String, (Dtype, Vec<usize>, usize, usize)>;

/// One memory-mapped shard and its validated tensor table.
struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: ShardTable,
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

/// Safetensors headers above this size are refused (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Most dimensions of a stored tensor (far above the 1 to 4 of real checkpoints).
pub const MAX_DIMS: usize = 64;
/// Memory charged per header entry beyond its name and dimensions: its entries in the shard
/// table and the set's index, and the allocator's overhead.
const ENTRY_OVERHEAD: u64 = 256;

/// A string from the header, borrowed when it has no escapes.
struct CowStr<'de>(Cow<'de, str>);

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = CowStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

// The visitors below read through `deserialize_any` and refuse a misplaced string with a
// message of their own: serde's default message quotes the whole string, which in a 100 MB
// header makes an error (and an allocation) of 100 MB.

/// The error for a string where `what` belongs.
fn misplaced_string<E: de::Error>(what: &str) -> E {
    E::custom(format!("a string where {what} belongs"))
}

/// `__metadata__`: a map of strings to strings, checked and dropped.
struct StrMap;

impl<'de> Deserialize<'de> for StrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`__metadata__`, a map of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<StrMap, A::Error> {
                while m.next_entry::<CowStr, CowStr>()?.is_some() {}
                Ok(StrMap)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<StrMap, E> {
                Err(misplaced_string("`__metadata__`"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A non-negative integer (a dimension or an offset).
struct Num(u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Num;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Num, E> {
                Err(misplaced_string("a number"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A shape of at most [`MAX_DIMS`] dimensions (a longer list is refused while it is read).
struct Shape(Vec<usize>);

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of dimensions")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<Shape, A::Error> {
                let mut dims = Vec::new();
                while let Some(Num(d)) = s.next_element()? {
                    if dims.len() == MAX_DIMS {
                        return Err(de::Error::custom(format!(
                            "a shape of more than {MAX_DIMS} dimensions"
                        )));
                    }
                    dims.push(usize::try_from(d).map_err(de::Error::custom)?);
                }
                Ok(Shape(dims))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Shape, E> {
                Err(misplaced_string("a shape"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `data_offsets`: exactly two numbers.
struct Offsets(u64, u64);

impl<'de> Deserialize<'de> for Offsets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Offsets;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`data_offsets`, a list of two offsets")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<Offsets, A::Error> {
                let two = (s.next_element::<Num>()?, s.next_element::<Num>()?);
                match (two, s.next_element::<de::IgnoredAny>()?) {
                    ((Some(Num(a)), Some(Num(b))), None) => Ok(Offsets(a, b)),
                    _ => Err(de::Error::custom(
                        "`data_offsets` must hold exactly two offsets",
                    )),
                }
            }
            fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Offsets, E> {
                Err(misplaced_string("`data_offsets`"))
            }
        }
        d.deserialize_any(V)
    }
}

/// One tensor's entry in the header, as written (other keys are ignored, as by the
/// reference implementation).
struct RawInfo<'a> {
    dtype: CowStr<'a>,
    shape: Shape,
    data_offsets: Offsets,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawInfo<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawInfo<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tensor entry (dtype, shape, data_offsets)")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<RawInfo<'a>, A::Error> {
                let (mut dtype, mut shape, mut offsets) = (None, None, None);
                while let Some(CowStr(k)) = m.next_key::<CowStr>()? {
                    let dup = match k.as_ref() {
                        "dtype" => dtype.replace(m.next_value::<CowStr>()?).is_some(),
                        "shape" => shape.replace(m.next_value::<Shape>()?).is_some(),
                        "data_offsets" => offsets.replace(m.next_value::<Offsets>()?).is_some(),
                        _ => {
                            m.next_value::<de::IgnoredAny>()?;
                            false
                        }
                    };
                    if dup {
                        return Err(de::Error::custom(format!("`{k}` appears twice")));
                    }
                }
                match (dtype, shape, offsets) {
                    (Some(dtype), Some(shape), Some(data_offsets)) => Ok(RawInfo {
                        dtype,
                        shape,
                        data_offsets,
                    }),
                    _ => Err(de::Error::custom(
                        "a tensor entry needs `dtype`, `shape` and `data_offsets`",
                    )),
                }
            }
            fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<RawInfo<'a>, E> {
                Err(misplaced_string("a tensor entry"))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// One tensor's entry, with its dtype known; offsets relative to the data section.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// The dtype named `s`, `None` for unknown names (a long one is not given to serde, whose
/// message would quote it whole).
fn dtype_by_name(s: &str) -> Option<Dtype> {
    if s.len() > 16 {
        return None;
    }
    Dtype::deserialize(de::value::StrDeserializer::<de::value::Error>::new(s)).ok()
}

/// Reads the header's entries into a map, refusing (while reading, before they are all in
/// memory) duplicate names, unknown dtypes and more entries than the file's budget allows.
struct HeaderSeed {
    budget: Budget,
}

impl<'de> Visitor<'de> for HeaderSeed {
    type Value = BTreeMap<String, Entry>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a safetensors header (a JSON object)")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Self::Value, E> {
        Err(misplaced_string("the header's object"))
    }
    fn visit_map<A: MapAccess<'de>>(
        mut self,
        mut m: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(CowStr(name)) = m.next_key::<CowStr>()? {
            if name == "__metadata__" {
                m.next_value::<StrMap>()?;
                continue;
            }
            let shown = clip(&name, MAX_NAME_CHARS);
            let raw: RawInfo = m.next_value()?;
            let dtype = dtype_by_name(&raw.dtype.0).ok_or_else(|| {
                de::Error::custom(format!(
                    "tensor `{shown}` has unknown dtype `{}`",
                    clip(&raw.dtype.0, MAX_NAME_CHARS)
                ))
            })?;
            let cost = ENTRY_OVERHEAD + name.len() as u64 + 8 * raw.shape.0.len() as u64;
            if !self.budget.take(cost) {
                return Err(de::Error::custom(format!(
                    "tensor `{shown}`: the header lists more tensors than its file can back (the parsed table would take more than {} bytes, the file's size plus 1 MiB)",
                    self.budget.limit()
                )));
            }
            if out.contains_key(name.as_ref()) {
                return Err(de::Error::custom(format!("tensor `{shown}` appears twice")));
            }
            let entry = Entry {
                dtype,
                shape: raw.shape.0,
                start: raw.data_offsets.0,
                end: raw.data_offsets.1,
            };
            out.insert(name.into_owned(), entry);
        }
        Ok(out)
    }
}

/// Parses and validates the header of the safetensors file `buf`: the entries with absolute
/// byte ranges. Checks what the reference implementation checks (contiguous data from the
/// start of the data section, sizes that match dtype and shape, the file's exact length),
/// plus duplicate names, dimension bounds and the memory budget, with messages that name
/// the tensor.
fn parse_header(buf: &[u8], path: &Path) -> Result<ShardTable> {
    let len = buf.len() as u64;
    if len < 8 {
        return Err(ModelError::format(
            path,
            format!(
                "safetensors header too small: the file has {len} bytes, the header length alone takes 8"
            ),
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > len - 8 {
        return Err(ModelError::format(
            path,
            format!("safetensors header length {n} runs past the end of the {len}-byte file"),
        ));
    }
    if n > MAX_HEADER_BYTES {
        return Err(ModelError::format(
            path,
            format!(
                "safetensors header of {n} bytes is over the format's {MAX_HEADER_BYTES}-byte limit"
            ),
        ));
    }
    let text = &buf[8..8 + n as usize];
    let mut de = serde_json::Deserializer::from_slice(text);
    let seed = HeaderSeed {
        budget: Budget::for_file(len),
    };
    let invalid =
        |e: serde_json::Error| ModelError::format(path, format!("invalid safetensors header: {e}"));
    let entries = (&mut de).deserialize_any(seed).map_err(invalid)?;
    de.end().map_err(invalid)?;

    let base = 8 + n;
    let mut order: Vec<(&String, &Entry)> = entries.iter().collect();
    order.sort_by_key(|(_, e)| (e.start, e.end));
    let mut pos = 0u64;
    for (name, e) in &order {
        let name = clip(name, MAX_NAME_CHARS);
        let fail = |msg: String| Err(ModelError::format(path, msg));
        if e.start != pos || e.end < e.start {
            return fail(format!(
                "invalid offset for tensor `{name}`: data_offsets [{}, {}], where the previous tensor's data ends at {pos}",
                e.start, e.end
            ));
        }
        let bits = e.dtype.bitsize() as u64;
        let nbits = e
            .shape
            .iter()
            .try_fold(bits, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| {
                ModelError::format(
                    path,
                    format!("tensor `{name}`: the product of its dimensions overflows"),
                )
            })?;
        if nbits % 8 != 0 || nbits / 8 != e.end - e.start {
            return fail(format!(
                "invalid shape, data type, or offset for tensor `{name}`: its {:?} values take {nbits} bits, its data_offsets span {} bytes",
                e.dtype,
                e.end - e.start
            ));
        }
        // A tensor of no values passes the size check whatever its dimensions, but they are
        // loop bounds downstream: none may exceed the values the file could hold.
        let most = (len.saturating_mul(8) / bits).max(1);
        if nbits == 0
            && let Some(d) = e.shape.iter().find(|&&d| d as u64 > most)
        {
            return fail(format!(
                "tensor `{name}`: dimension {d} is more than the {most} {:?} values a {len}-byte file can hold",
                e.dtype
            ));
        }
        pos = e.end;
    }
    let end = base.saturating_add(pos);
    if end > len {
        return Err(ModelError::format(
            path,
            format!(
                "tensor data runs past the end of the file: the header places data up to byte {end}, the file has {len} bytes"
            ),
        ));
    }
    if end < len {
        return Err(ModelError::format(
            path,
            format!(
                "{} bytes after the last tensor's data (byte {end}) are not described by the header",
                len - end
            ),
        ));
    }
    let base = base as usize;
    Ok(entries
        .into_iter()
        .map(|(name, e)| {
            (
                name,
                (
                    e.dtype,
                    e.shape,
                    base + e.start as usize,
                    base + e.end as usize,
                ),
            )
        })
        .collect())
}

fn open_shard(path: &Path) -> Result<Shard> {
    // Opening a FIFO blocks and a device has no size: only regular files are read.
    crate::io::check_regular(path, u64::MAX)?;
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only map of a file this process does not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let tensors = parse_header(&mmap, path)?;
    Ok(Shard {
        path: path.into(),
        mmap,
        tensors,
    })
}

/// The distinct shard files an index's `weight_map` names, read as a stream: a large index
/// costs memory only for its distinct shard names, charged to the file's budget.
struct ShardNames {
    budget: Budget,
    names: BTreeSet<String>,
}

impl<'de> de::DeserializeSeed<'de> for &mut ShardNames {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut ShardNames {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("`weight_map`, a map of tensor names to shard file names")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<(), A::Error> {
        while let Some((CowStr(_), CowStr(f))) = m.next_entry::<CowStr, CowStr>()? {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') || f.is_empty() {
                return Err(de::Error::custom(format!(
                    "shard name `{}` must be a plain file name",
                    clip(&f, MAX_NAME_CHARS)
                )));
            }
            if !self.names.contains(f.as_ref()) {
                if !self.budget.take(ENTRY_OVERHEAD + f.len() as u64) {
                    return Err(de::Error::custom(
                        "the index names more shard files than its size allows",
                    ));
                }
                self.names.insert(f.into_owned());
            }
        }
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<(), E> {
        Err(misplaced_string("`weight_map`"))
    }
}

/// The top level of an index: `weight_map` read into [`ShardNames`], other keys skipped.
struct IndexTop<'a>(&'a mut ShardNames);

impl<'de> Visitor<'de> for IndexTop<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a shard index (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<bool, A::Error> {
        let mut found = false;
        while let Some(CowStr(k)) = m.next_key::<CowStr>()? {
            if k == "weight_map" && !found {
                m.next_value_seed(&mut *self.0)?;
                found = true;
            } else {
                m.next_value::<de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<bool, E> {
        Err(misplaced_string("the index's object"))
    }
}

/// The shard files of `model.safetensors.index.json` at `path`, sorted.
fn index_shards(path: &Path) -> Result<BTreeSet<String>> {
    let text = crate::io::read_text(path, crate::io::INDEX_LIMIT)?;
    let mut names = ShardNames {
        budget: Budget::for_file(text.len() as u64),
        names: BTreeSet::new(),
    };
    let mut de = serde_json::Deserializer::from_str(&text);
    let invalid = |e: serde_json::Error| ModelError::format(path, format!("invalid index: {e}"));
    let found = (&mut de)
        .deserialize_any(IndexTop(&mut names))
        .map_err(invalid)?;
    de.end().map_err(invalid)?;
    if !found {
        return Err(ModelError::format(path, "missing `weight_map`"));
    }
    Ok(names.names)
}

impl SafetensorsSet {
    /// Opens the weights of the HF folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            index_shards(&index_path)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
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
                        format!(
                            "tensor `{}` appears in two shards",
                            clip(name, MAX_NAME_CHARS)
                        ),
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
        let Some(e) = self.index.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[e.shard];
        let Some(out) = floats_to_f32(e.dtype, &shard.mmap[e.start..e.end]) else {
            return Err(ModelError::UnsupportedDtype {
                path: shard.path.clone(),
                tensor: name.into(),
                dtype: format!("{:?}", e.dtype),
            });
        };
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

/// Little-endian F32, F16 or BF16 values as f32; `None` for other dtypes.
pub(crate) fn floats_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let size = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => return None,
    };
    let mut out = vec![0f32; bytes.len() / size];
    let chunks = out.par_iter_mut().zip(bytes.par_chunks_exact(size));
    match dtype {
        Dtype::F32 => chunks.for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => chunks.for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => chunks.for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
    }
    Some(out)
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
    /// 8-bit signed integer (e.g. bitsandbytes' int8 weights).
    I8,
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
            Self::I8 => "I8",
            Self::I32 => "I32",
            Self::I64 => "I64",
        }
    }
    fn size(self) -> usize {
        match self {
            Self::Float(d) => d.size(),
            Self::U8 | Self::I8 => 1,
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
