//! The library's error type. Every error that comes from user input names the
//! file (and where it applies the key and the shapes) so the message alone says
//! what to fix.

use std::path::{Path, PathBuf};

/// Result alias used across the library.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The I/O error is in the message, not a `source` as well: `{:#}`
    /// (how the CLI prints errors) would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: not found")]
    NotFound { path: PathBuf },

    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },

    #[error("{path}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingKey {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
    },

    #[error("{path}: tensor `{key}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: {count} unexpected tensor(s) the model does not use, e.g. `{first}`")]
    UnexpectedKeys {
        path: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{path}: unsupported dtype {dtype} for tensor `{key}`")]
    UnsupportedDType {
        path: PathBuf,
        key: String,
        dtype: String,
    },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },

    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// An I/O error on `path`: [`Error::NotFound`] when it is not there.
    pub fn reading(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::io(path, source)
        }
    }

    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
