//! Size control: evicting the least recently used entries until a cache is within its limits,
//! and pruning old function versions. Every eviction is appended to `v1/evictions.log`.
//!
//! Recency is an entry's modification time, which a hit refreshes when it is over an hour old
//! (see [`crate::store`]): reliable where access times are off or coarse, and cheap.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::Error;
use crate::inventory::FunctionInfo;
use crate::store::{Store, LAYOUT_DIR};

/// The file, in the layout folder, that lists every eviction: one tab-separated line each
/// (Unix time, reason, function, version, key, bytes).
pub const EVICTION_LOG: &str = "evictions.log";

/// What [`Memory::reduce_size`](crate::Memory::reduce_size) may keep. Every limit is optional; none is set by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// At most this many bytes of entries.
    pub max_bytes: Option<u64>,
    /// At most this many entries.
    pub max_items: Option<usize>,
    /// No entry unused for longer than this.
    pub max_age: Option<Duration>,
    /// At most this many versions per function, the most recently used ones (with
    /// `max_version_age`, a version goes only when it is past both).
    pub keep_versions: Option<usize>,
    /// No version unused for longer than this (with `keep_versions`, a version goes only when it
    /// is past both).
    pub max_version_age: Option<Duration>,
    /// Versions never pruned by `keep_versions`, as (function, version folder) names: the ones a
    /// program compiles in today.
    pub protect: Vec<(String, String)>,
    /// List what would go, remove nothing.
    pub dry_run: bool,
}

impl Limits {
    /// No limit: add the ones you want with the builder methods.
    pub fn new() -> Self {
        Limits::default()
    }

    /// At most `bytes` bytes of entries.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// At most `items` entries.
    pub fn max_items(mut self, items: usize) -> Self {
        self.max_items = Some(items);
        self
    }

    /// No entry unused for longer than `age`.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// At most `versions` versions per function.
    pub fn keep_versions(mut self, versions: usize) -> Self {
        self.keep_versions = Some(versions);
        self
    }

    /// No version unused for longer than `age`.
    pub fn max_version_age(mut self, age: Duration) -> Self {
        self.max_version_age = Some(age);
        self
    }

    /// Never prune this version of this function (names as [`Memory::functions`](crate::Memory::functions) gives them).
    pub fn protect(mut self, function: impl Into<String>, version: impl Into<String>) -> Self {
        self.protect.push((function.into(), version.into()));
        self
    }

    /// List what would go, remove nothing.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// Why an entry was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// Its version is older than the `keep_versions` newest.
    OldVersion,
    /// Unused for longer than `max_age`.
    Age,
    /// Over `max_items`.
    Items,
    /// Over `max_bytes`.
    Bytes,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::OldVersion => "old-version",
            Reason::Age => "age",
            Reason::Items => "items",
            Reason::Bytes => "bytes",
        }
    }
}

/// One entry evicted (or, in a dry run, to be evicted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Eviction {
    /// The function's name.
    pub function: String,
    /// The version folder's name.
    pub version: String,
    /// The entry's key.
    pub key: String,
    /// Its file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last used.
    pub last_used: SystemTime,
    /// Why it goes.
    pub reason: Reason,
}

/// What [`Memory::reduce_size`](crate::Memory::reduce_size) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GcReport {
    /// The entries evicted (or to be evicted, in a dry run), in order.
    pub evicted: Vec<Eviction>,
    /// Entries kept.
    pub kept_entries: usize,
    /// Bytes kept.
    pub kept_bytes: u64,
    /// Whether nothing was removed.
    pub dry_run: bool,
}

/// What goes: entries with their reason, and the version folders pruned whole.
struct Plan {
    evicted: Vec<(Candidate, Reason)>,
    old_versions: Vec<(String, String)>,
}

/// Decides what goes, from the inventory.
fn plan(functions: &[FunctionInfo], entries: Vec<Candidate>, limits: &Limits) -> Plan {
    let mut evicted = Vec::new();
    let mut kept = Vec::new();
    let now = SystemTime::now();
    let pruning = limits.keep_versions.is_some() || limits.max_version_age.is_some();
    let old_versions: Vec<(&str, &str)> = functions
        .iter()
        .flat_map(|f| {
            // Versions are listed most recently used first.
            f.versions
                .iter()
                .enumerate()
                .map(move |(rank, v)| (f.name.as_str(), rank, v))
        })
        .filter(|(_, rank, v)| {
            let beyond_count = limits.keep_versions.is_none_or(|keep| *rank >= keep);
            let too_old = limits.max_version_age.is_none_or(|age| {
                v.last_used
                    .is_none_or(|used| now.duration_since(used).unwrap_or_default() > age)
            });
            pruning && beyond_count && too_old
        })
        .map(|(f, _, v)| (f, v.version.as_str()))
        .filter(|(f, v)| {
            !limits
                .protect
                .iter()
                .any(|(pf, pv)| pf == f && (pv == v || pv.starts_with(v)))
        })
        .collect();
    for candidate in entries {
        let old_version = old_versions
            .iter()
            .any(|(f, v)| *f == candidate.function && *v == candidate.version);
        let too_old = limits
            .max_age
            .is_some_and(|age| now.duration_since(candidate.last_used).unwrap_or_default() > age);
        if old_version {
            evicted.push((candidate, Reason::OldVersion));
        } else if too_old {
            evicted.push((candidate, Reason::Age));
        } else {
            kept.push(candidate);
        }
    }
    // Least recently used first.
    kept.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.key.cmp(&b.key)));
    let mut count = kept.len();
    let mut bytes: u64 = kept.iter().map(|c| c.size).sum();
    for candidate in kept {
        let over_items = limits.max_items.is_some_and(|max| count > max);
        let over_bytes = limits.max_bytes.is_some_and(|max| bytes > max);
        if !(over_items || over_bytes) {
            // The rest is more recently used, and the limits hold.
            break;
        }
        count -= 1;
        bytes -= candidate.size;
        let reason = if over_items {
            Reason::Items
        } else {
            Reason::Bytes
        };
        evicted.push((candidate, reason));
    }
    Plan {
        evicted,
        old_versions: old_versions
            .into_iter()
            .map(|(f, v)| (f.to_owned(), v.to_owned()))
            .collect(),
    }
}

/// One line of the eviction log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LoggedEviction {
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// Why: `old-version`, `age`, `items` or `bytes`.
    pub reason: String,
    /// The function's name.
    pub function: String,
    /// The version folder's name.
    pub version: String,
    /// The entry's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Reads the eviction log of the cache at `location` (empty when nothing was evicted yet);
/// lines that do not parse are skipped.
pub(crate) fn read_log(location: &Path) -> Result<Vec<LoggedEviction>, Error> {
    let path = location.join(LAYOUT_DIR).join(EVICTION_LOG);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading the eviction log", &path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            Some(LoggedEviction {
                at: fields.next()?.parse().ok()?,
                reason: fields.next()?.to_owned(),
                function: fields.next()?.to_owned(),
                version: fields.next()?.to_owned(),
                key: fields.next()?.to_owned(),
                size: fields.next()?.parse().ok()?,
            })
        })
        .collect())
}

/// An entry that may be evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub function: String,
    pub version: String,
    pub key: String,
    pub path: PathBuf,
    pub size: u64,
    pub last_used: SystemTime,
}

/// How many bytes may be stored between two checks of a size limit: a tenth of it, at least
/// 1 MiB.
pub(crate) fn check_interval(limit: u64) -> u64 {
    (limit / 10).max(1 << 20)
}

/// Enforces a size limit of `store` (whose folder is `location`) on a thread of its own.
pub(crate) fn enforce_in_background(
    store: std::sync::Arc<dyn Store>,
    location: PathBuf,
    limit: u64,
) {
    let spawned = std::thread::Builder::new()
        .name("memo-gc".into())
        .spawn(move || {
            let limits = Limits::new().max_bytes(limit);
            if let Err(error) = reduce_size(&*store, &location, &limits) {
                crate::log::warn(&format!("enforcing the cache size limit: {error}"));
            }
        });
    drop(spawned);
}

/// Runs [`Memory::reduce_size`] on a store (and its location, for the eviction log).
pub(crate) fn reduce_size(
    store: &dyn Store,
    location: &Path,
    limits: &Limits,
) -> Result<GcReport, Error> {
    // One pass over the folders: the versions and their entries together.
    let listing = store.listing()?;
    let mut candidates = Vec::new();
    for listed in &listing {
        let function = &listed.info;
        for (version, entries) in function.versions.iter().zip(&listed.entries) {
            for entry in entries.iter().cloned() {
                candidates.push(Candidate {
                    function: function.name.clone(),
                    version: version.version.clone(),
                    key: entry.key,
                    path: entry.path,
                    size: entry.size,
                    last_used: entry.last_used,
                });
            }
        }
    }
    let total_entries = candidates.len();
    let total_bytes: u64 = candidates.iter().map(|c| c.size).sum();
    let functions: Vec<FunctionInfo> = listing.into_iter().map(|l| l.info).collect();
    let Plan {
        evicted: planned,
        old_versions,
    } = plan(&functions, candidates, limits);
    let mut report = GcReport {
        evicted: Vec::with_capacity(planned.len()),
        kept_entries: total_entries - planned.len(),
        kept_bytes: total_bytes - planned.iter().map(|(c, _)| c.size).sum::<u64>(),
        dry_run: limits.dry_run,
    };
    let mut log = String::new();
    // What was removed before a failure is logged all the same.
    let evict = || -> Result<(), Error> {
        for (candidate, reason) in planned {
            if !limits.dry_run {
                // An entry already gone (another process evicted it) is not an error.
                store.remove_entry(&candidate.path)?;
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                log.push_str(&format!(
                    "{secs}\t{}\t{}\t{}\t{}\t{}\n",
                    reason.as_str(),
                    candidate.function,
                    candidate.version,
                    candidate.key,
                    candidate.size
                ));
            }
            report.evicted.push(Eviction {
                function: candidate.function,
                version: candidate.version,
                key: candidate.key,
                path: candidate.path,
                size: candidate.size,
                last_used: candidate.last_used,
                reason,
            });
        }
        if !limits.dry_run && !report.evicted.is_empty() {
            // Evicted packed entries free their space when their packs are merged.
            store.compact();
        }
        if !limits.dry_run {
            for (function, version) in &old_versions {
                store.remove_version(function, version)?;
            }
        }
        Ok(())
    };
    let evicted = evict();
    let logged = append_to_eviction_log(location, &log);
    evicted?;
    logged?;
    Ok(report)
}

/// Appends `lines` (when there are any) to the eviction log of the cache at `location`. With a
/// remote store, evictions are logged in the local folder of the machine that evicted, which
/// may have stored nothing yet.
fn append_to_eviction_log(location: &Path, lines: &str) -> Result<(), Error> {
    if lines.is_empty() {
        return Ok(());
    }
    let path = location.join(LAYOUT_DIR).join(EVICTION_LOG);
    std::fs::create_dir_all(location.join(LAYOUT_DIR))
        .map_err(|e| Error::io("creating the folder of the eviction log", &path, e))?;
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
    options
        .open(&path)
        .and_then(|mut file| file.write_all(lines.as_bytes()))
        .map_err(|e| Error::io("appending to the eviction log", &path, e))
}
