//! Bounded reading of the small files around the weights (`config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`, the shard index), and the memory budget
//! of header parsing.
//!
//! A side file is read only when it is a regular file (after following symlinks: a link to
//! `/dev/zero` or a FIFO is refused before it is opened) no larger than its limit; the
//! limits are far above any real file. Header parsers charge what they allocate against
//! a budget: the file's size plus [`PARSE_MARGIN`], so a file can never make its parsed
//! table larger than itself plus a fixed margin.

use std::io::Read;
use std::path::Path;

use crate::error::{ModelError, Result};

/// Largest `config.json` or `generation_config.json` read (real ones are a few KiB).
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// Largest `tokenizer_config.json` read (chat templates and added-token tables reach ~1 MiB).
pub const TOKENIZER_CONFIG_LIMIT: u64 = 16 << 20;
/// Largest `tokenizer.json` read (a 256k-token vocabulary with its merges is ~35 MiB).
pub const TOKENIZER_LIMIT: u64 = 64 << 20;
/// Largest `model.safetensors.index.json` read (~100 bytes per tensor).
pub const INDEX_LIMIT: u64 = 64 << 20;

/// The limit for a side file, by its file name; [`CONFIG_LIMIT`] for names not listed.
pub fn side_file_limit(path: &Path) -> u64 {
    match path.file_name().and_then(|n| n.to_str()) {
        Some("tokenizer.json") => TOKENIZER_LIMIT,
        Some("tokenizer_config.json") => TOKENIZER_CONFIG_LIMIT,
        Some("model.safetensors.index.json") => INDEX_LIMIT,
        _ => CONFIG_LIMIT,
    }
}

/// Checks that `path` is a regular file of at most `limit` bytes; returns its size.
pub fn check_regular(path: &Path, limit: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::format(
            path,
            "not a regular file (a device, FIFO, directory or a link to one is refused)",
        ));
    }
    if meta.len() > limit {
        return Err(ModelError::format(
            path,
            format!(
                "{} bytes is more than the {limit}-byte limit for this file",
                meta.len()
            ),
        ));
    }
    Ok(meta.len())
}

/// Reads the UTF-8 text file `path` if it is a regular file of at most `limit` bytes (a file
/// that grows while being read is cut at `limit + 1` bytes and refused).
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    let len = check_regular(path, limit)?;
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut text = String::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| ModelError::io(path, e))?;
    if text.len() as u64 > limit {
        return Err(ModelError::format(
            path,
            format!("grew past the {limit}-byte limit for this file while being read"),
        ));
    }
    Ok(text)
}

/// Reads a side file with the limit [`side_file_limit`] gives its name.
pub fn read_side_file(path: &Path) -> Result<String> {
    read_text(path, side_file_limit(path))
}

/// Copies the side file `src` to `dst` with the checks of [`read_side_file`] (a link to
/// `/dev/zero` would otherwise fill the disk).
pub fn copy_side_file(src: &Path, dst: &Path) -> Result<()> {
    let text = read_side_file(src)?;
    std::fs::write(dst, text).map_err(|e| ModelError::io(dst, e))
}

/// Extra bytes, beyond the file's own size, that parsing one file's header may allocate: room
/// for the fixed costs (maps, names) of small files.
pub const PARSE_MARGIN: u64 = 1 << 20;

/// The memory a header parser may still allocate: the file's size plus [`PARSE_MARGIN`].
/// Parsers charge each entry (its name, value and a fixed per-entry overhead) before making
/// it, so a file of many tiny entries is refused instead of ballooning.
#[derive(Debug)]
pub(crate) struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    /// The budget of a file of `file_len` bytes.
    pub(crate) fn for_file(file_len: u64) -> Self {
        let limit = file_len.saturating_add(PARSE_MARGIN);
        Self { left: limit, limit }
    }
    /// Takes `bytes`; false when that is more than is left.
    pub(crate) fn take(&mut self, bytes: u64) -> bool {
        match self.left.checked_sub(bytes) {
            Some(l) => {
                self.left = l;
                true
            }
            None => false,
        }
    }
    /// The whole budget in bytes, for messages.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }
}
