//! What a cache holds: functions, their versions and entries, for people and tools (the
//! inspector, `examples/inspect.rs`, is a thin shell over this).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// One cached function in a cache folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FunctionInfo {
    /// Its folder name: module path and name, `::` written `.` (e.g. `my_crate.physics.simulate`).
    pub name: String,
    /// Its versions, most recently used first.
    pub versions: Vec<VersionInfo>,
}

impl FunctionInfo {
    /// Entries of all versions.
    pub fn entries(&self) -> usize {
        self.versions.iter().map(|v| v.entries).sum()
    }

    /// Bytes of all versions' entries.
    pub fn bytes(&self) -> u64 {
        self.versions.iter().map(|v| v.bytes).sum()
    }

    /// When an entry of any version was last used.
    pub fn last_used(&self) -> Option<SystemTime> {
        self.versions.iter().filter_map(|v| v.last_used).max()
    }

    /// The compute time stored with all entries: what their hits save.
    pub fn compute_time(&self) -> Duration {
        self.versions.iter().map(|v| v.compute_time).sum()
    }
}

/// One version of a cached function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VersionInfo {
    /// The version folder's name: the first 16 hex digits of the version hash.
    pub version: String,
    /// The full version hash, from `source.rs`, when it is there.
    pub full_version: Option<String>,
    /// Entries stored for this version.
    pub entries: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// When one of them was last used (written, or read: memo refreshes an entry's
    /// modification time on a hit, at most once an hour).
    pub last_used: Option<SystemTime>,
    /// The compute time stored with the entries.
    pub compute_time: Duration,
}

/// A function and the entries of each of its versions (`entries[i]` belongs to
/// `info.versions[i]`), as one pass over a cache reads them.
#[derive(Debug)]
pub(crate) struct Listed {
    pub info: FunctionInfo,
    pub entries: Vec<Vec<EntryInfo>>,
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EntryInfo {
    /// Its key, 64 hex digits (also its file name).
    pub key: String,
    /// Its file; for a packed entry, the path its file would have, which names it to
    /// [`Memory::remove_broken`](crate::Memory::remove_broken) and eviction.
    pub path: PathBuf,
    /// Whether it is a record in one of its version's packs rather than a file of its own.
    pub packed: bool,
    /// When the value was computed.
    pub created: SystemTime,
    /// When it was last used (see [`VersionInfo::last_used`]).
    pub last_used: SystemTime,
    /// How long the computation took.
    pub duration: Duration,
    /// Its size in bytes (for a packed entry, its record's).
    pub size: u64,
    /// Whether its header is readable; a broken entry is listed with zero times.
    pub readable: bool,
    /// A short `Debug` form of the arguments it was computed from (`…` for an argument whose
    /// type has no `Debug`), when one was recorded.
    pub preview: Option<String>,
}
