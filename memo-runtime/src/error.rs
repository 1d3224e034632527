//! The runtime's error type.

use std::io;
use std::path::PathBuf;

use crate::entry::CorruptEntry;
use crate::key::KeyError;

/// Everything that can go wrong in memo's runtime. Each variant names what was being done and,
/// for storage, the path involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What memo was doing, e.g. "writing cache entry".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A stored entry is damaged or of another format; it is treated as a miss.
    #[error("broken cache entry {}: {reason}", path.display())]
    Corrupt {
        /// The entry's path.
        path: PathBuf,
        /// What is wrong with it.
        reason: CorruptEntry,
    },
    /// A stored value could not be decoded as the function's return type (for example because
    /// the type's definition changed); it is treated as a miss.
    #[error("cache entry {} does not decode as `{type_name}`: {message}", path.display())]
    Decode {
        /// The entry's path.
        path: PathBuf,
        /// The return type.
        type_name: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// The return value could not be encoded, so it was not stored.
    #[error("the result of `{function}` could not be encoded for the cache: {message}")]
    Encode {
        /// The function's path.
        function: String,
        /// The encoder's message.
        message: String,
    },
    /// An argument's `Serialize` implementation failed, so no key could be made.
    #[error("an argument of `{function}` could not be hashed into a cache key: {source}")]
    Key {
        /// The function's path.
        function: String,
        /// The serializer's error.
        #[source]
        source: KeyError,
    },
    /// A request to a remote store failed (after its retries), or the store answered with an
    /// error.
    #[error("{action} the remote cache {location}: {message}")]
    Remote {
        /// What memo was doing, e.g. "reading from".
        action: &'static str,
        /// The remote store's URL.
        location: String,
        /// What went wrong.
        message: String,
    },
    /// A cache location or setting is not valid.
    #[error("{message}")]
    Config {
        /// What is wrong, naming the setting.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
