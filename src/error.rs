//! One error type for the library. Every variant that concerns user data names the file,
//! and the message says what to do about it; the CLI prints it as one line.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-supplied file is unreadable, malformed or inconsistent.
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    /// The dataset or the command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// The configuration file or a configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing a file failed at the operating-system level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A numerical stage could not produce a meaningful result (e.g. an empty mask).
    #[error("{0}")]
    Numerics(String),
    /// The work cannot be done within the memory the user allows (`--mem-gb`).
    #[error("{0}")]
    Memory(String),
}

impl Error {
    pub fn input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
