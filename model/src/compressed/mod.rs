//! compressed-tensors HF folders, read as dense ones: `pack-quantized` (integer codes packed
//! in i32 words with per-group scales and zero points, written by `compress quant`) and
//! `sparse-bitmask` (each linear's non-zeros plus a bitmask, written by `compress prune
//! --format sparse`). `config.json`'s `quantization_config` names the format; every compressed
//! linear `X` then shows as the one tensor `X.weight`, its stored parts hidden, and is rebuilt
//! as f32 when it is read, one tensor at a time like every other.
//!
//! The parts are checked when the folder is opened: dtypes, and shapes against each other and
//! against `X.weight_shape` / `X.shape`. What only the data can show (group indices, row
//! offsets, set bits) is checked when the tensor is read, before the output is allocated.

mod codec;
mod config;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use codec::{
    PACKED_BITS, PackedParts, PackedShapes, PartError, decode_bitmask, dequantize_packed,
    pack_codes, packed_words, unpack_codes,
};
pub use config::{PACK_QUANTIZED, SPARSE_BITMASK};

use crate::checkpoint::TensorMeta;
use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};
use crate::safetensors_io::{Dtype, SafetensorsSet, StEntry};
use config::{Layout, WeightArgs};

/// How one compressed linear is stored.
#[derive(Debug, Clone)]
enum Kind {
    Packed { args: WeightArgs, g_idx: bool },
    Sparse { dtype: Dtype },
}

/// A compressed linear: module `X`, shown as `X.weight`.
#[derive(Debug, Clone)]
struct Linear {
    module: String,
    /// `[rows, cols]`.
    shape: Vec<usize>,
    kind: Kind,
    /// Bytes of its stored parts.
    bytes: u64,
}

/// The weights of an HF folder as the model sees them: the stored tensors, with each
/// compressed linear's parts replaced by its `X.weight`.
pub(crate) struct HfWeights {
    set: SafetensorsSet,
    format: Option<&'static str>,
    /// Compressed linears by the name of the weight they stand for.
    linears: BTreeMap<String, Linear>,
    /// Stored tensors that are parts of a compressed linear.
    parts: BTreeSet<String>,
}

/// Bytes of a stored tensor (sizes were checked against the file when it was opened).
fn stored_bytes(e: &StEntry) -> u64 {
    e.shape.iter().map(|&d| d as u64).product::<u64>() * e.dtype.bitsize() as u64 / 8
}

/// Converts stored little-endian integers to i64 (`I32` or `I64`).
fn ints(dtype: Dtype, b: &[u8]) -> Vec<i64> {
    match dtype {
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        _ => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    }
}

impl HfWeights {
    /// Opens the weights of the HF folder `dir`, whose `config.json` (at `cfg_path`) reads
    /// `cfg_text`.
    pub fn open(dir: &Path, cfg_text: &str, cfg_path: &Path) -> Result<Self> {
        let layout = config::layout(cfg_text, cfg_path)?;
        let set = SafetensorsSet::open(dir)?;
        let mut w = Self {
            format: layout.format(),
            set,
            linears: BTreeMap::new(),
            parts: BTreeSet::new(),
        };
        let (key, groups) = match &layout {
            Layout::Dense => return Ok(w),
            Layout::Packed(g) => (".weight_packed", g.as_slice()),
            Layout::Sparse => (".bitmask", &[][..]),
        };
        let modules: Vec<String> = w
            .set
            .entries()
            .keys()
            .filter_map(|n| n.strip_suffix(key).map(str::to_string))
            .collect();
        for module in modules {
            let weight = format!("{module}.weight");
            if w.set.entries().contains_key(&weight) {
                return Err(w.bad(&weight, format!("is stored both dense and as {key}")));
            }
            let lin = match &layout {
                Layout::Packed(_) => {
                    let args = config::args_for(groups, &module)
                        .map_err(|m| w.bad(&format!("{module}{key}"), m))?;
                    w.packed(&module, args)?
                }
                _ => w.sparse(&module)?,
            };
            w.linears.insert(weight, lin);
        }
        Ok(w)
    }

    /// An error about stored tensor `tensor`, naming its file.
    fn bad(&self, tensor: &str, msg: String) -> ModelError {
        let path: PathBuf = self
            .set
            .shard_path(tensor)
            .or_else(|| self.set.files().first().copied())
            .map_or_else(PathBuf::new, Path::to_path_buf);
        ModelError::format(
            path,
            format!("tensor `{}`: {msg}", clip(tensor, MAX_NAME_CHARS)),
        )
    }

    /// The entry of part `module.suffix`, which must exist, have one of `dtypes` and, when
    /// `shape` is given, that shape (`basis` says where it comes from); it is recorded as
    /// hidden behind its linear.
    fn part(
        &mut self,
        module: &str,
        suffix: &str,
        dtypes: &[Dtype],
        shape: Option<&[usize]>,
        basis: &str,
    ) -> Result<StEntry> {
        let name = format!("{module}.{suffix}");
        let Some(e) = self.set.entries().get(&name).cloned() else {
            return Err(self.bad(&name, "is missing".into()));
        };
        if !dtypes.contains(&e.dtype) {
            return Err(self.bad(
                &name,
                format!("has dtype {:?}, expected {dtypes:?}", e.dtype),
            ));
        }
        if let Some(s) = shape
            && e.shape != s
        {
            let msg = format!("has shape {:?}, expected {s:?}{basis}", e.shape);
            return Err(self.bad(&name, msg));
        }
        self.parts.insert(name);
        Ok(e)
    }

    /// `[rows, cols]` from a stored shape part (`I32` or `I64` `[2]`), both positive.
    fn dims(&mut self, module: &str, suffix: &str) -> Result<(usize, usize)> {
        let name = format!("{module}.{suffix}");
        let e = self.part(module, suffix, &[Dtype::I64, Dtype::I32], Some(&[2]), "")?;
        let v = self
            .set
            .with_bytes(&name, |b| ints(e.dtype, b))
            .unwrap_or_default();
        match v[..] {
            [r, c] if r > 0 && c > 0 && usize::try_from(r.max(c)).is_ok() => {
                Ok((r as usize, c as usize))
            }
            _ => Err(self.bad(&name, format!("{v:?} is not a shape of two positive sizes"))),
        }
    }

    /// Checks the parts of packed module `module` against each other and the config.
    fn packed(&mut self, module: &str, args: WeightArgs) -> Result<Linear> {
        let (rows, cols) = self.dims(module, "weight_shape")?;
        let s = PackedShapes::new(args.bits, rows, cols, args.group)
            .map_err(|e| self.bad(&format!("{module}.weight_shape"), e.msg))?;
        let i32s = [Dtype::I32];
        let basis = format!(
            " for a {rows} x {cols} weight of {}-bit codes in {} group(s)",
            args.bits,
            s.groups()
        );
        let mut bytes = stored_bytes(&self.set.entries()[&format!("{module}.weight_shape")]);
        let packed = self.part(module, "weight_packed", &i32s, Some(&s.packed), &basis)?;
        let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
        let scale = self.part(module, "weight_scale", &floats, Some(&s.scale), &basis)?;
        bytes += stored_bytes(&packed) + stored_bytes(&scale);
        let zp = format!("{module}.weight_zero_point");
        match (args.sym, self.set.entries().contains_key(&zp)) {
            (false, _) => {
                let z = self.part(
                    module,
                    "weight_zero_point",
                    &i32s,
                    Some(&s.zero_point),
                    &basis,
                )?;
                bytes += stored_bytes(&z);
            }
            (true, true) => {
                return Err(self.bad(&zp, "is stored, but its config group is symmetric".into()));
            }
            (true, false) => {}
        }
        let g_idx = self
            .set
            .entries()
            .contains_key(&format!("{module}.weight_g_idx"));
        if g_idx {
            let g = self.part(module, "weight_g_idx", &i32s, Some(&[s.g_idx]), &basis)?;
            bytes += stored_bytes(&g);
        }
        Ok(Linear {
            module: module.into(),
            shape: vec![rows, cols],
            kind: Kind::Packed { args, g_idx },
            bytes,
        })
    }

    /// Checks the parts of sparse module `module` against each other.
    fn sparse(&mut self, module: &str) -> Result<Linear> {
        let (rows, cols) = self.dims(module, "shape")?;
        let basis = format!(" for a {rows} x {cols} weight");
        let mask_shape = [rows, cols.div_ceil(8)];
        let bitmask = self.part(module, "bitmask", &[Dtype::U8], Some(&mask_shape), &basis)?;
        let offsets = self.part(module, "row_offsets", &[Dtype::I64], Some(&[rows]), &basis)?;
        let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
        let values = self.part(module, "compressed", &floats, None, "")?;
        let name = format!("{module}.compressed");
        match values.shape[..] {
            [n] if n as u64 <= rows as u64 * cols as u64 => {}
            _ => {
                let msg = format!(
                    "has shape {:?}, expected one dimension of at most {rows} x {cols} values",
                    values.shape
                );
                return Err(self.bad(&name, msg));
            }
        }
        let shape_bytes = stored_bytes(&self.set.entries()[&format!("{module}.shape")]);
        Ok(Linear {
            module: module.into(),
            shape: vec![rows, cols],
            kind: Kind::Sparse {
                dtype: values.dtype,
            },
            bytes: stored_bytes(&bitmask)
                + stored_bytes(&offsets)
                + stored_bytes(&values)
                + shape_bytes,
        })
    }

    /// `pack-quantized`, `sparse-bitmask`, or `None` for plain weights.
    pub fn format(&self) -> Option<&'static str> {
        self.format
    }

    /// Every tensor's name, as the model sees them.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let stored = self
            .set
            .entries()
            .keys()
            .filter(|n| !self.parts.contains(*n));
        let mut all: Vec<&str> = stored
            .chain(self.linears.keys())
            .map(String::as_str)
            .collect();
        all.sort_unstable();
        all.into_iter()
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        if let Some(l) = self.linears.get(name) {
            return Some(&l.shape);
        }
        if self.parts.contains(name) {
            return None;
        }
        self.set.entries().get(name).map(|e| e.shape.as_slice())
    }

    /// Every tensor's metadata (a compressed linear's dtype names its format, its bytes are
    /// those of its parts).
    pub fn metas(&self) -> Vec<TensorMeta> {
        self.names()
            .map(|name| match self.linears.get(name) {
                Some(l) => TensorMeta {
                    name: name.into(),
                    shape: l.shape.clone(),
                    dtype: match &l.kind {
                        Kind::Packed { args, .. } => format!("int{} ({PACK_QUANTIZED})", args.bits),
                        Kind::Sparse { dtype } => format!("{dtype:?} ({SPARSE_BITMASK})"),
                    },
                    bytes: l.bytes,
                },
                None => {
                    let e = &self.set.entries()[name];
                    TensorMeta {
                        name: name.into(),
                        shape: e.shape.clone(),
                        dtype: format!("{:?}", e.dtype),
                        bytes: stored_bytes(e),
                    }
                }
            })
            .collect()
    }

    /// Bytes of the weight files.
    pub fn bytes_on_disk(&self) -> u64 {
        self.set.bytes_on_disk()
    }

    /// Reads tensor `name` as f32, decompressing a compressed linear; `None` when absent.
    pub fn read_f32(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(l) = self.linears.get(name) else {
            if self.parts.contains(name) {
                return Ok(None);
            }
            return Ok(self.set.read_f32(name)?.map(|(d, _)| d));
        };
        let (rows, cols) = (l.shape[0], l.shape[1]);
        let m = &l.module;
        let part = |s: &str| format!("{m}.{s}");
        let vanished = |s: &str| self.bad(&part(s), "vanished".into());
        let data = match &l.kind {
            Kind::Packed { args, g_idx } => {
                let read_i32s = |s: &str| -> Result<Vec<i32>> {
                    self.set
                        .with_bytes(&part(s), i32s)
                        .ok_or_else(|| vanished(s))
                };
                let scale = self
                    .set
                    .read_f32(&part("weight_scale"))?
                    .ok_or_else(|| vanished("weight_scale"))?
                    .0;
                let zero_point = (!args.sym)
                    .then(|| read_i32s("weight_zero_point"))
                    .transpose()?;
                let g_idx = g_idx.then(|| read_i32s("weight_g_idx")).transpose()?;
                let packed = read_i32s("weight_packed")?;
                dequantize_packed(&PackedParts {
                    bits: args.bits,
                    rows,
                    cols,
                    group: args.group,
                    packed: &packed,
                    scale: &scale,
                    zero_point: zero_point.as_deref(),
                    g_idx: g_idx.as_deref(),
                })
            }
            Kind::Sparse { dtype } => {
                let offsets = self
                    .set
                    .with_bytes(&part("row_offsets"), |b| ints(Dtype::I64, b))
                    .ok_or_else(|| vanished("row_offsets"))?;
                let elem = dtype.bitsize() / 8;
                let dense = self
                    .set
                    .with_bytes(&part("bitmask"), |mask| {
                        self.set.with_bytes(&part("compressed"), |values| {
                            decode_bitmask(mask, &offsets, values, elem, rows, cols)
                        })
                    })
                    .flatten()
                    .ok_or_else(|| vanished("compressed"))?;
                // The dtype was checked to be a float when the folder was opened.
                let unsupported = || self.bad(&part("compressed"), format!("has dtype {dtype:?}"));
                match dense {
                    Ok(d) => {
                        Ok(crate::safetensors_io::floats_to_f32(*dtype, &d)
                            .ok_or_else(unsupported)?)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        data.map(Some).map_err(|e| self.bad(&part(e.part), e.msg))
    }
}

/// Stored little-endian I32 values.
fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
