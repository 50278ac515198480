//! One error type for everything the model crate reads, with the file and the problem in
//! every message, so the command line can print a single actionable line.
//!
//! Messages embed text from the files being read (tensor names, keys, parser messages), so
//! every message is shown through [`clip`]: control characters are escaped (one line) and
//! long text is cut (a 50 MB tensor name must not become a 50 MB error). A line is at most
//! [`MAX_PATH_CHARS`] + [`MAX_MSG_CHARS`] + a few characters of fixed text.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Most characters of a path shown in an error (its end is kept: the file name).
pub const MAX_PATH_CHARS: usize = 100;
/// Most characters of an error's message part.
pub const MAX_MSG_CHARS: usize = 180;
/// Most characters of a name (tensor, key, token) embedded in a message.
pub const MAX_NAME_CHARS: usize = 64;

/// `s` made fit for a one-line message: control characters escaped and at most `max`
/// characters kept, the cut marked with the original length.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    let fits = s.len() <= max && !s.chars().any(char::is_control);
    if fits {
        return Cow::Borrowed(s);
    }
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n >= max {
            let _ = write!(out, "…({} bytes)", s.len());
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A path for a message: its last [`MAX_PATH_CHARS`] characters, escaped.
fn show_path(p: &Path) -> String {
    let s = p.display().to_string();
    let n = s.chars().count();
    if n <= MAX_PATH_CHARS {
        return clip(&s, MAX_PATH_CHARS).into_owned();
    }
    let tail: String = s.chars().skip(n - (MAX_PATH_CHARS - 1)).collect();
    format!("…{}", clip(&tail, MAX_PATH_CHARS))
}

/// A shape for a message: at most 8 dimensions, then how many there are.
fn show_shape(s: &[usize]) -> String {
    if s.len() <= 8 {
        return format!("{s:?}");
    }
    format!("{:?}… ({} dimensions)", &s[..8], s.len())
}

/// Errors raised while reading configs, checkpoints and tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("{}: {}", show_path(.path), clip(&.source.to_string(), MAX_MSG_CHARS))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file's bytes do not follow its format (truncated, overlapping, bad lengths...).
    #[error("{}: {}", show_path(.path), clip(.msg, MAX_MSG_CHARS))]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        msg: String,
    },
    /// The configuration is missing a key, has a wrong value, or names an unknown family.
    #[error("{}: {}", show_path(.path), clip(.msg, MAX_MSG_CHARS))]
    Config {
        /// The file the configuration came from.
        path: PathBuf,
        /// What is wrong, in words.
        msg: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{}: missing tensor `{}`", show_path(.path), clip(.tensor, MAX_NAME_CHARS))]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
    },
    /// A tensor has a different shape than the config implies.
    #[error(
        "{}: tensor `{}` has shape {}, expected {}",
        show_path(.path),
        clip(.tensor, MAX_NAME_CHARS),
        show_shape(.found),
        show_shape(.expected)
    )]
    ShapeMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinite values.
    #[error(
        "{}: tensor `{}` contains {count} non-finite values (NaN or Inf)",
        show_path(.path),
        clip(.tensor, MAX_NAME_CHARS)
    )]
    NonFinite {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
        /// How many values are not finite.
        count: usize,
    },
    /// A tensor is stored in a type this crate cannot read.
    #[error(
        "{}: tensor `{}` has unsupported type {}",
        show_path(.path),
        clip(.tensor, MAX_NAME_CHARS),
        clip(.dtype, MAX_NAME_CHARS)
    )]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The type's name.
        dtype: String,
    },
    /// The tokenizer could not be built or loaded.
    #[error("{}: tokenizer: {}", show_path(.path), clip(.msg, MAX_MSG_CHARS))]
    Tokenizer {
        /// The file the tokenizer came from.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

impl ModelError {
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// A config error for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// An I/O error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_escapes_and_cuts() {
        assert_eq!(clip("plain", 10), "plain");
        assert_eq!(clip("a\nb", 10), "a\\nb");
        let long = "x".repeat(1000);
        let c = clip(&long, 5);
        assert_eq!(c, "xxxxx…(1000 bytes)");
        let e = ModelError::format("/m.gguf", format!("tensor `{long}`\n"));
        let s = e.to_string();
        assert!(!s.contains('\n') && s.chars().count() < 300, "{s}");
    }
}
