//! The top-level error: what failed, with context, a `hint:` line for users and
//! an exit code that follows the kind of failure (see README, "Exit codes").

use std::fmt;

use crate::config::ConfigError;
use crate::pg::PgError;
use crate::pipeline::SealError;
use crate::repo::RepoError;
use crate::storage::{StorageError, StorageErrorKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit codes; documented in the README.
pub mod exit {
    pub const OK: i32 = 0;
    /// archive-get: the repository has no such file.
    pub const NOT_FOUND: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const FAILURE: i32 = 3;
    pub const STORE: i32 = 4;
    pub const POSTGRES: i32 = 5;
    pub const INTEGRITY: i32 = 6;
    pub const BUSY: i32 = 7;
    pub const NOT_REACHED: i32 = 8;
    /// archive-get for any failure but "not found": PostgreSQL stops recovery
    /// (exit codes above 125 are fatal to it) instead of ending it early.
    pub const ARCHIVE_GET_FATAL: i32 = 126;
}

#[derive(Debug)]
pub enum Error {
    Usage(String),
    Config(ConfigError),
    Storage(StorageError),
    Pg(PgError),
    Seal(SealError),
    Repo(RepoError),
    /// Any other failure, with its own exit code and hint.
    Failed {
        message: String,
        hint: Option<String>,
        code: i32,
    },
    Context {
        context: String,
        source: Box<Error>,
    },
}

impl Error {
    pub fn failed(message: impl Into<String>) -> Self {
        Error::Failed { message: message.into(), hint: None, code: exit::FAILURE }
    }

    pub fn with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Failed { message: message.into(), hint: Some(hint.into()), code: exit::FAILURE }
    }

    pub fn coded(code: i32, message: impl Into<String>, hint: Option<String>) -> Self {
        Error::Failed { message: message.into(), hint, code }
    }

    /// Wraps the error with what was being done.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context { context: context.into(), source: Box::new(self) }
    }

    /// The innermost error, under any context.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Usage(_) => Some("see `walvault --help`".into()),
            Error::Config(e) => e.hint(),
            Error::Storage(e) => e.hint().map(String::from),
            Error::Pg(e) => e.hint(),
            Error::Seal(e) => e.hint().map(String::from),
            Error::Repo(e) => e.hint(),
            Error::Failed { hint, .. } => hint.clone(),
            Error::Context { source, .. } => source.hint(),
        }
    }

    /// Prints the error and its hint on standard error, as a failed command
    /// reports it; returns its exit code.
    pub fn report(&self) -> i32 {
        eprintln!("error: {self}");
        if let Some(hint) = self.hint() {
            eprintln!("hint: {hint}");
        }
        self.exit_code()
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Config(_) => exit::USAGE,
            Error::Storage(e) => storage_code(e),
            Error::Pg(_) => exit::POSTGRES,
            Error::Seal(e) if e.is_integrity() => exit::INTEGRITY,
            Error::Seal(SealError::NoRecipients | SealError::NoIdentity | SealError::BadKey(_)) => exit::USAGE,
            Error::Seal(_) => exit::FAILURE,
            Error::Repo(e) => match e {
                RepoError::Storage(s) => storage_code(s),
                RepoError::Seal(s) if s.is_integrity() => exit::INTEGRITY,
                RepoError::Integrity { .. } | RepoError::BadSignature { .. } | RepoError::UntrustedSigner { .. } => exit::INTEGRITY,
                RepoError::KeyFile { .. } | RepoError::BadKey(_) => exit::USAGE,
                _ => exit::FAILURE,
            },
            Error::Failed { code, .. } => *code,
            Error::Context { source, .. } => source.exit_code(),
        }
    }

    /// True when the failure is about the store being unreachable or failing
    /// transiently (archive-get must then not report "not found").
    pub fn is_not_found(&self) -> bool {
        match self.root() {
            Error::Storage(e) | Error::Repo(RepoError::Storage(e)) => e.kind() == StorageErrorKind::NotFound,
            _ => false,
        }
    }
}

fn storage_code(e: &StorageError) -> i32 {
    match e.kind() {
        StorageErrorKind::InvalidInput => exit::FAILURE,
        _ => exit::STORE,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => f.write_str(m),
            Error::Config(e) => write!(f, "{e}"),
            Error::Storage(e) => write!(f, "{e}"),
            Error::Pg(e) => write!(f, "{e}"),
            Error::Seal(e) => write!(f, "{e}"),
            Error::Repo(e) => write!(f, "{e}"),
            Error::Failed { message, .. } => f.write_str(message),
            Error::Context { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {}

macro_rules! from {
    ($t:ty, $v:ident) => {
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::$v(e)
            }
        }
    };
}
from!(ConfigError, Config);
from!(StorageError, Storage);
from!(PgError, Pg);
from!(SealError, Seal);
from!(RepoError, Repo);

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::failed(e.to_string())
    }
}

/// Adds context to results, as `anyhow::Context` does, keeping the kind.
pub trait ResultExt<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}
