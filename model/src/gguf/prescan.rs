//! A bounds check of a GGUF header before gguf-rs decodes it. gguf-rs allocates a string's
//! claimed length (up to 1 GiB) before reading it, so a hostile header could make it allocate
//! far more than the file holds; this walk reads every length and checks it against the bytes
//! that remain, allocating nothing. Hand-written because no crate offers such a check.

use std::path::Path;

use super::GgmlType;
use crate::error::{ModelError, Result};

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn fail<T>(&self, what: &str) -> Result<T> {
        Err(ModelError::format(
            self.path,
            format!(
                "truncated or corrupt GGUF header: {what} at byte {} of {}",
                self.pos,
                self.buf.len()
            ),
        ))
    }
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return self.fail(&format!("{what} needs {n} bytes, {remaining} remain"));
        }
        self.pos += n as usize;
        Ok(())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let start = self.pos;
        self.skip(4, what)?;
        Ok(u32::from_le_bytes(
            self.buf[start..start + 4].try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let start = self.pos;
        self.skip(8, what)?;
        Ok(u64::from_le_bytes(
            self.buf[start..start + 8].try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.u64(what)?;
        let start = self.pos;
        self.skip(n, what)?;
        Ok(&self.buf[start..self.pos])
    }
}

/// Fixed byte size of a scalar metadata value type, `None` for strings and arrays.
fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Walks the header, metadata and tensor infos of `buf`, checking every length.
pub fn check(buf: &[u8], path: &Path) -> Result<()> {
    let mut c = Cursor { buf, pos: 0, path };
    if buf.len() < 4 || &buf[..4] != b"GGUF" {
        return Err(ModelError::format(path, "not a GGUF file (bad magic)"));
    }
    c.pos = 4;
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::format(
            path,
            format!("unsupported GGUF version {version} (2 and 3 are)"),
        ));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    for i in 0..n_kv {
        c.string(&format!("metadata key {i}"))?;
        let ty = c.u32("metadata value type")?;
        match ty {
            8 => {
                c.string("metadata string")?;
            }
            9 => {
                let item = c.u32("array item type")?;
                let len = c.u64("array length")?;
                if let Some(sz) = scalar_size(item) {
                    match len.checked_mul(sz) {
                        Some(n) => c.skip(n, "metadata array")?,
                        None => return c.fail("metadata array length overflows"),
                    }
                } else if item == 8 {
                    for _ in 0..len {
                        c.string("metadata array string")?;
                    }
                } else {
                    return c.fail(&format!("metadata array of unsupported item type {item}"));
                }
            }
            t => match scalar_size(t) {
                Some(sz) => c.skip(sz, "metadata value")?,
                None => return c.fail(&format!("unknown metadata value type {t}")),
            },
        }
    }
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor {i} name"))?;
        let dims = c.u32("tensor dimension count")?;
        if dims > 4 {
            return c.fail(&format!("tensor {i} has {dims} dimensions (at most 4)"));
        }
        let mut numel: u64 = 1;
        for _ in 0..dims {
            let d = c.u64("tensor dimension")?;
            numel = match numel.checked_mul(d) {
                Some(n) => n,
                None => {
                    return c.fail(&format!(
                        "tensor {i}: the product of its dimensions overflows"
                    ));
                }
            };
        }
        // gguf-rs reaches `unreachable!` on some ids (GGML_TYPE_COUNT = 40), so unknown ids
        // are refused here, before it decodes them.
        let ty = c.u32("tensor type")?;
        if GgmlType::from_id(ty).is_none() {
            let name = String::from_utf8_lossy(name);
            return Err(ModelError::format(
                path,
                format!("tensor `{name}` has unknown type id {ty}"),
            ));
        }
        c.u64("tensor offset")?;
    }
    Ok(())
}
