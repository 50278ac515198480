//! One error type for everything the model crate reads, with the file and the problem in
//! every message, so the command line can print a single actionable line.

use std::path::PathBuf;

/// Errors raised while reading configs, checkpoints and tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file's bytes do not follow its format (truncated, overlapping, bad lengths...).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        msg: String,
    },
    /// The configuration is missing a key, has a wrong value, or names an unknown family.
    #[error("{path}: {msg}")]
    Config {
        /// The file the configuration came from.
        path: PathBuf,
        /// What is wrong, in words.
        msg: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
    },
    /// A tensor has a different shape than the config implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
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
    #[error("{path}: tensor `{tensor}` contains {count} non-finite values (NaN or Inf)")]
    NonFinite {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
        /// How many values are not finite.
        count: usize,
    },
    /// A tensor is stored in a type this crate cannot read.
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The type's name.
        dtype: String,
    },
    /// The tokenizer could not be built or loaded.
    #[error("{path}: tokenizer: {msg}")]
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
