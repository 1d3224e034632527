//! The storage layer: where entries live and how they are written and read.
//!
//! Layout of the default directory store (see `docs/FORMAT.md`):
//!
//! ```text
//! <root>/                       MEMO_DIR, or the default location
//!   .gitignore, CACHEDIR.TAG    written when memo creates the root
//!   v1/                         layout version
//!     .gitignore                always: `*`
//!     <function>/               e.g. `my_crate.physics.simulate` (module path, `::` -> `.`)
//!       <version>/              first 16 hex digits of the function-version hash
//!         source.rs             the source text that version was compiled from
//!         .generation, packs/   entries up to the pack limit, as records (Unix; see `pack`)
//!         <kk>/<key>            a larger entry: `kk` = first two hex digits of the key
//! ```
//!
//! Entries are immutable: a packed one is a checksummed record appended to a pack, a larger one
//! is written to an unnamed or temporary file in its final folder and named when complete, so a
//! reader sees either no entry or a complete one.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use crate::entry::{self, HEADER_LEN};
use crate::error::Error;
use crate::inventory::{EntryInfo, FunctionInfo, Listed, VersionInfo};
use crate::key::CacheKey;
use crate::lock::{self, Acquired};
#[cfg(unix)]
use crate::pack::{self, Found, Packs};

/// Name of the layout folder under the root; bumped when the layout changes.
pub const LAYOUT_DIR: &str = "v1";
/// File holding a function version's source text.
pub const SOURCE_FILE: &str = "source.rs";
/// File of a function version's argument previews: one `key<TAB>preview` line per stored entry.
pub const PREVIEW_FILE: &str = "previews.tsv";
/// How many hex digits of the version hash name a version's folder. The full hash is part of
/// every entry's key, so two versions that shared a folder could still never read each other.
pub const VERSION_DIR_DIGITS: usize = 16;
const TEMP_PREFIX: &str = ".tmp-";
/// Suffix of the lock file of an entry being computed: `<key>.lock`.
const LOCK_SUFFIX: &str = ".lock";
/// A version folder's shared lock file, whose bytes are its keys' locks (Linux).
pub const LOCKS_FILE: &str = ".locks";
/// Entries up to this size are read in one go; larger ones header first.
const READ_WHOLE: u64 = 64 * 1024;
/// A hit refreshes its entry's modification time (its "last used" time) when it is older than
/// this: recency stays reliable (access times are often off) and cheap (no write on most hits).
pub const TOUCH_AFTER: Duration = Duration::from_secs(3600);

/// Where one entry lives, independent of the storage backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryAddress<'a> {
    /// The function's folder name, from [`function_dir_name`].
    pub function: &'a str,
    /// The full version hash (hex).
    pub version: &'a str,
    /// The entry's key.
    pub key: &'a CacheKey,
}

/// The operations memo needs from a storage backend. Generated code never sees this trait, so
/// the layout can change without touching the macro.
pub(crate) trait Store: Send + Sync {
    /// Where the entry lives, for messages.
    fn describe(&self, at: &EntryAddress<'_>) -> PathBuf;
    /// Where the entries of one function version live.
    fn version_location(&self, function: &str, version: &str) -> PathBuf;
    /// The stored bytes of an entry, or `None` when there is none.
    fn read(&self, at: &EntryAddress<'_>) -> Result<Option<EntryBytes>, Error>;
    /// Whether something is stored under the entry's key (intact or not), without reading it
    /// when the store can tell so.
    fn contains(&self, at: &EntryAddress<'_>) -> bool {
        matches!(self.read(at), Ok(Some(_)))
    }
    /// Stores an entry atomically, with the arguments' preview when there is one: readers see
    /// the old state or the complete new entry.
    fn write(
        &self,
        at: &EntryAddress<'_>,
        header: &[u8],
        payload: &[u8],
        preview: Option<&str>,
    ) -> Result<(), Error>;
    /// Marks an entry as just used (for least-recently-used eviction), best effort: called
    /// when a value served from memory was last marked long ago ([`TOUCH_AFTER`]).
    fn touch(&self, at: &EntryAddress<'_>);
    /// Records the source text of a function version, if it is not recorded yet.
    fn save_source(&self, function: &str, version: &str, text: &str) -> Result<(), Error>;
    /// Takes the cross-process lock of an entry, waiting at most `timeout` for another holder.
    fn lock(&self, at: &EntryAddress<'_>, timeout: Option<Duration>) -> Result<Acquired, Error>;
    /// Removes temporary files and abandoned lock files older than `older_than` left in the
    /// folders of one function version by processes that died.
    fn clean_version(
        &self,
        function: &str,
        version: &str,
        older_than: Duration,
    ) -> Result<Cleanup, Error>;
    /// Checks every stored entry (header, key, checksum) and counts leftover files.
    fn verify(&self) -> Result<VerifyReport, Error>;
    /// Every stored function version, as (function folder, version folder) names.
    fn versions(&self) -> Vec<(String, String)>;
    /// What is stored: every function and version, with counts, sizes and times, and their
    /// entries, in one pass.
    fn listing(&self) -> Result<Vec<Listed>, Error>;
    /// The source text recorded for a function version.
    fn source(&self, function: &str, version: &str) -> Result<String, Error>;
    /// The entries of one function version (`version`: the version folder's name).
    fn entries(&self, function: &str, version: &str) -> Result<Vec<EntryInfo>, Error>;
    /// Removes every entry of every version of a function.
    fn clear_function(&self, function: &str) -> Result<(), Error>;
    /// Removes one version of a function: its entries and its source.
    fn remove_version(&self, function: &str, version: &str) -> Result<(), Error>;
    /// Removes everything memo stored.
    fn clear(&self) -> Result<(), Error>;
    /// Removes one entry, named by the path a listing or a verification gave for it; whether
    /// it was there (an entry already gone is not an error).
    fn remove_entry(&self, path: &Path) -> Result<bool, Error>;
    /// Whether an entry that a verification reported broken (named by the path it gave) is
    /// broken still: a program may have stored it again since. A store that cannot tell says
    /// yes.
    fn still_broken(&self, path: &Path) -> bool {
        let _ = path;
        true
    }
    /// Where the cache lives, as a URL, when it is not (only) a local folder.
    fn remote_url(&self) -> Option<&str> {
        None
    }
    /// Whether a failure of a remote store is an error (strict mode) rather than a warning.
    fn set_strict(&self, _strict: bool) {}
    /// Reclaims the space of removed entries where that is worth it (after an eviction).
    fn compact(&self) {}
    /// Writes out entries still waiting in memory.
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// The folder name of a function identity (`crate::module::name`): `::` becomes `.`, and any
/// character outside `[A-Za-z0-9_]` is escaped as `%XX` per UTF-8 byte, so the mapping is
/// injective (identifiers never contain `.` or `%`).
pub fn function_dir_name(identity: &str) -> String {
    let mut name = String::with_capacity(identity.len());
    for (i, segment) in identity.split("::").enumerate() {
        if i > 0 {
            name.push('.');
        }
        for ch in segment.chars() {
            if ch.is_ascii_alphanumeric() || ch == '_' {
                name.push(ch);
            } else {
                let mut utf8 = [0u8; 4];
                for byte in ch.encode_utf8(&mut utf8).bytes() {
                    name.push_str(&format!("%{byte:02X}"));
                }
            }
        }
    }
    name
}

/// The default backend: a local folder, small entries in packs and larger ones in files.
#[derive(Debug)]
pub(crate) struct DirStore {
    root: PathBuf,
    base: PathBuf,
    /// Folders below `base` already checked not to be symbolic links, in this process.
    checked: Mutex<HashSet<PathBuf>>,
    /// Whether each entry is flushed to the disk (`fsync`, then its folder) before a write returns.
    durable: bool,
    /// The version folders' preview files, kept open for appending.
    preview_files: Mutex<HashMap<PathBuf, Arc<File>>>,
    /// The version folders' lock files, kept open (Linux).
    #[cfg(target_os = "linux")]
    lock_files: Mutex<HashMap<PathBuf, Arc<lock::range::LockFile>>>,
    /// Entries up to this many bytes (header and payload) are appended to packs.
    pack_limit: u64,
    /// Strict mode: no entry waits in memory, so that a failed write is the caller's error.
    strict: std::sync::atomic::AtomicBool,
    /// The packs of the versions used, by short version name, then function folder name.
    #[cfg(unix)]
    packs: RwLock<PackMap>,
    /// Counts the removals from `packs` (a version removed, or all let go), so that a thread's
    /// [`LastPacks`] taken before one is not used after it.
    #[cfg(unix)]
    packs_epoch: AtomicU64,
    /// This store among the stores of the process, for [`LastPacks`].
    #[cfg(unix)]
    id: u64,
}

/// The packs a thread used last, so that its next look-up of the same version takes neither
/// the shared map's lock nor its hash (a thread mostly calls one function at a time, and the
/// map's lock is one cache line for all threads). It keeps those packs open (a file and its
/// mapping) until the thread uses another version, even after their store is dropped: one
/// version per thread.
#[cfg(unix)]
#[derive(Default)]
struct LastPacks {
    /// The [`DirStore::id`] and [`DirStore::packs_epoch`] it was taken under.
    store: u64,
    epoch: u64,
    function: String,
    short: String,
    packs: Option<Arc<Packs>>,
}

#[cfg(unix)]
thread_local! {
    static LAST_PACKS: std::cell::RefCell<LastPacks> = std::cell::RefCell::default();
}

/// The packs of the versions a store used: short version name -> (function folder, packs).
#[cfg(unix)]
type PackMap = HashMap<String, Vec<(String, Arc<Packs>)>, rustc_hash::FxBuildHasher>;

/// Entries up to this size (72-byte header and payload) are packed by default.
pub const DEFAULT_PACK_LIMIT: u64 = 16 * 1024;
/// The largest pack limit: larger entries always have a file of their own.
pub const MAX_PACK_LIMIT: u64 = 64 << 20;

/// What [`Memory::clean`](crate::Memory::clean) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cleanup {
    /// Temporary files of writes that never finished.
    pub temporary_files: usize,
    /// Lock files of computations whose process died.
    pub lock_files: usize,
}

/// What [`Memory::verify`](crate::Memory::verify) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Entries whose header, key and checksum are right.
    pub valid: usize,
    /// Entries that are not, with the reason; each is a miss when read.
    pub broken: Vec<(PathBuf, String)>,
    /// Temporary files present (writes in progress, or of processes that died).
    pub temporary_files: usize,
    /// Lock files present (computations in progress, or of processes that died).
    pub lock_files: usize,
}

impl DirStore {
    pub(crate) fn new(root: PathBuf) -> Self {
        let base = root.join(LAYOUT_DIR);
        DirStore {
            root,
            base,
            checked: Mutex::new(HashSet::new()),
            durable: false,
            preview_files: Mutex::default(),
            #[cfg(target_os = "linux")]
            lock_files: Mutex::default(),
            pack_limit: DEFAULT_PACK_LIMIT,
            strict: std::sync::atomic::AtomicBool::new(false),
            #[cfg(unix)]
            packs: RwLock::default(),
            #[cfg(unix)]
            packs_epoch: AtomicU64::new(0),
            #[cfg(unix)]
            id: {
                static STORES: AtomicU64 = AtomicU64::new(1);
                STORES.fetch_add(1, Ordering::Relaxed)
            },
        }
    }

    /// The same store, packing entries up to `bytes` (0: every entry in a file of its own).
    pub(crate) fn pack_limit(mut self, bytes: u64) -> Self {
        self.pack_limit = bytes.min(MAX_PACK_LIMIT);
        self
    }

    /// The packs of a version folder (`short`: its name), created on first use.
    #[cfg(unix)]
    fn packs_of(&self, function: &str, short: &str) -> Result<Arc<Packs>, Error> {
        // Read before the map: a removal after this makes the next look-up miss the
        // thread's copy.
        let epoch = self.packs_epoch.load(Ordering::Acquire);
        let last = LAST_PACKS.try_with(|last| {
            let last = last.try_borrow().ok()?;
            let same = last.store == self.id
                && last.epoch == epoch
                && last.short == short
                && last.function == function;
            last.packs.as_ref().filter(|_| same).map(Arc::clone)
        });
        if let Ok(Some(packs)) = last {
            return Ok(packs);
        }
        let packs = self.packs_in_map(function, short)?;
        let _ = LAST_PACKS.try_with(|last| {
            if let Ok(mut last) = last.try_borrow_mut() {
                let last = &mut *last;
                (last.store, last.epoch) = (self.id, epoch);
                last.function.clear();
                last.function.push_str(function);
                last.short.clear();
                last.short.push_str(short);
                last.packs = Some(Arc::clone(&packs));
            }
        });
        Ok(packs)
    }

    /// [`DirStore::packs_of`] from the shared map.
    #[cfg(unix)]
    fn packs_in_map(&self, function: &str, short: &str) -> Result<Arc<Packs>, Error> {
        {
            let map = self.packs.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(found) = map
                .get(short)
                .and_then(|list| list.iter().find(|(name, _)| name == function))
            {
                return Ok(Arc::clone(&found.1));
            }
        }
        let dir = self.base.join(function).join(short);
        self.check_no_links(&dir)?;
        let mut map = self.packs.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= KEEP_OPEN * 2 {
            // Many versions in one process: their indexes are rebuilt when used again.
            map.clear();
            self.packs_epoch.fetch_add(1, Ordering::Release);
        }
        let list = map.entry(short.to_owned()).or_default();
        if let Some(found) = list.iter().find(|(name, _)| name == function) {
            return Ok(Arc::clone(&found.1));
        }
        let packs = Arc::new(Packs::new(dir, self.durable));
        list.push((function.to_owned(), Arc::clone(&packs)));
        Ok(packs)
    }

    /// Appends a record for `at` to its version's packs; with `defer`, it may wait in memory for
    /// a moment ([`pack::FLUSH_AFTER`]).
    #[cfg(unix)]
    fn append(
        &self,
        at: &EntryAddress<'_>,
        kind: pack::Kind,
        body: &[&[u8]],
        preview: Option<&str>,
        defer: bool,
    ) -> Result<(), Error> {
        let packs = self.packs_at(at)?;
        let create = |dir: &Path| -> io::Result<()> {
            self.create_dir(dir).map_err(io::Error::other)?;
            self.check_no_links(dir).map_err(io::Error::other)
        };
        let preview = preview.map_or(&b""[..], str::as_bytes);
        packs
            .append(
                pack::NewRecord {
                    kind,
                    key: at.key,
                    body,
                    preview,
                    defer,
                },
                &create,
            )
            .map_err(|e| {
                Error::io(
                    "appending to the packs of",
                    self.version_dir(at.function, at.version),
                    e,
                )
            })
    }

    /// Records a use of a packed entry just read, when its latest recorded use (`used`,
    /// nanoseconds since the Unix epoch) is older than [`TOUCH_AFTER`] (as a read refreshes an
    /// entry file's time): a "used" record, which may wait in memory. Best effort.
    #[cfg(unix)]
    fn note_use(&self, at: &EntryAddress<'_>, used: u64) {
        let stale = pack::now_nanos_coarse().saturating_sub(TOUCH_AFTER.as_nanos() as u64);
        if used < stale {
            let _ = self.append(at, pack::Kind::Used, &[], None, true);
        }
    }

    /// The packs of the version folder of `at`.
    #[cfg(unix)]
    fn packs_at(&self, at: &EntryAddress<'_>) -> Result<Arc<Packs>, Error> {
        let short = at.version.get(..VERSION_DIR_DIGITS).unwrap_or(at.version);
        self.packs_of(at.function, short)
    }

    /// Takes the cross-process lock of one key ([`Store::lock`]).
    #[cfg(target_os = "linux")]
    fn take_key_lock(
        &self,
        at: &EntryAddress<'_>,
        timeout: Option<Duration>,
    ) -> Result<Acquired, Error> {
        let dir = self.version_dir(at.function, at.version);
        self.check_no_links(&dir)?;
        let path = dir.join(LOCKS_FILE);
        // The opening errors are this store's own; only the locking ones come back as io errors.
        let failed = std::cell::RefCell::new(None);
        let open = |again: bool| {
            self.lock_file(&dir, again).map_err(|error| {
                *failed.borrow_mut() = Some(error);
                io::Error::other("cannot open the lock file")
            })
        };
        let outcome =
            lock::range::acquire(&path, open, lock::range::offset(at.key.as_bytes()), timeout);
        match (outcome, failed.into_inner()) {
            (Ok(acquired), _) => Ok(acquired),
            (Err(_), Some(error)) => Err(error),
            (Err(e), None) => Err(Error::io("locking cache entry in", &path, e)),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn take_key_lock(
        &self,
        at: &EntryAddress<'_>,
        timeout: Option<Duration>,
    ) -> Result<Acquired, Error> {
        let path = self.lock_path(at);
        let dir = path.parent().unwrap_or(&self.base).to_path_buf();
        self.check_no_links(&dir)?;
        let fail = |e| Error::io("locking cache entry", &path, e);
        match lock::acquire(&path, timeout) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dir(&dir)?;
                self.check_no_links(&dir)?;
                lock::acquire(&path, timeout).map_err(fail)
            }
            other => other.map_err(fail),
        }
    }

    /// Tells the processes using the version folders `dirs` that they are being removed, and
    /// forgets this process's packs of them.
    fn retire(&self, dirs: &[PathBuf]) {
        #[cfg(unix)]
        {
            for dir in dirs {
                pack::mark_removed(dir);
            }
            // Only those versions' packs are forgotten (with what waits in memory for them):
            // the other versions' records stay, waiting ones included.
            let mut map = self.packs.write().unwrap_or_else(PoisonError::into_inner);
            for list in map.values_mut() {
                list.retain(|(_, packs)| {
                    let removed = dirs.iter().any(|dir| packs.dir() == dir.as_path());
                    if removed {
                        packs.forget();
                    }
                    !removed
                });
            }
            map.retain(|_, list| !list.is_empty());
            self.packs_epoch.fetch_add(1, Ordering::Release);
        }
        #[cfg(not(unix))]
        let _ = dirs;
    }

    /// Removes `target`, the folder of (or above) the retired `versions`; those still there when
    /// that fails are in use again (their counters no longer say "removed").
    fn remove_retired(target: &Path, versions: &[PathBuf]) -> Result<(), Error> {
        let removed = remove_dir(target);
        #[cfg(unix)]
        if removed.is_err() {
            for dir in versions.iter().filter(|dir| dir.is_dir()) {
                pack::unmark_removed(dir);
            }
        }
        #[cfg(not(unix))]
        let _ = versions;
        removed
    }

    /// The same store, flushing each entry to the disk before a write returns when `durable`.
    pub(crate) fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Flushes a folder's list of names to the disk, so that a new name in it survives a power
    /// failure (the file's own data is flushed before it is named).
    fn sync_dir(&self, dir: &Path) -> Result<(), Error> {
        if !self.durable {
            return Ok(());
        }
        #[cfg(unix)]
        File::open(dir)
            .and_then(|folder| folder.sync_all())
            .map_err(|e| Error::io("flushing to disk the folder", dir, e))?;
        Ok(())
    }

    /// Records the argument preview of an entry that has a file of its own.
    fn save_preview(&self, at: &EntryAddress<'_>, preview: &str) -> Result<(), Error> {
        let path = self.version_dir(at.function, at.version).join(PREVIEW_FILE);
        let line = crate::preview::line(&at.key.to_hex(), preview);
        let fail = |e| Error::io("recording an argument preview in", &path, e);
        // Kept open: a miss appends one line with one write. (Should another process remove the
        // version folder meanwhile, the lines go to the removed file: previews are best effort.)
        let file = {
            let mut files = self
                .preview_files
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match files.get(&path) {
                Some(file) => Arc::clone(file),
                None => {
                    let mut options = fs::OpenOptions::new();
                    options.create(true).append(true);
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::OpenOptionsExt;
                        // Arguments go into it: never through a link to another file.
                        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
                    }
                    let file = Arc::new(options.open(&path).map_err(fail)?);
                    keep_open(&mut files, path.clone(), &file);
                    file
                }
            }
        };
        // One write per line: lines of concurrent writers never interleave.
        (&*file).write_all(line.as_bytes()).map_err(fail)
    }

    /// The function folder, version folder and key of an entry's path
    /// (`<base>/<function>/<version>/<kk>/<key>`), when it is one.
    #[cfg(unix)]
    fn packed_address(&self, path: &Path) -> Option<(String, String, CacheKey)> {
        let below = path.strip_prefix(&self.base).ok()?;
        let parts: Vec<&str> = below
            .iter()
            .map(|part| part.to_str())
            .collect::<Option<_>>()?;
        let [function, short, _, name] = parts.as_slice() else {
            return None;
        };
        let key = decode_hex_key(name)?;
        Some((
            plain_name(function).ok()?.to_owned(),
            plain_name(short).ok()?.to_owned(),
            key,
        ))
    }

    /// The entries of a version folder's packs, as a listing shows them.
    #[cfg(unix)]
    fn packed_entries(dir: &Path) -> Vec<EntryInfo> {
        let contents = pack::contents(dir, false);
        contents
            .entries
            .into_iter()
            .map(|packed| {
                let hex = packed.key.to_hex();
                let decoded = entry::decode_header(&packed.body).ok();
                EntryInfo {
                    path: dir.join(&hex[..2]).join(&hex),
                    packed: true,
                    key: hex,
                    created: decoded.map_or(SystemTime::UNIX_EPOCH, |h| h.created),
                    last_used: SystemTime::UNIX_EPOCH + Duration::from_nanos(packed.last_used),
                    duration: decoded.map_or(Duration::ZERO, |h| h.duration),
                    size: packed.size,
                    readable: decoded.is_some(),
                    preview: packed.preview,
                }
            })
            .collect()
    }

    /// Closes the files kept open, before this store removes folders.
    fn forget_open_files(&self) {
        self.preview_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        #[cfg(target_os = "linux")]
        self.lock_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The open lock file of a version folder: the one kept, unless `again`; else opened (and
    /// the folder created) now.
    #[cfg(target_os = "linux")]
    fn lock_file(&self, dir: &Path, again: bool) -> Result<Arc<lock::range::LockFile>, Error> {
        let mut files = self
            .lock_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !again {
            if let Some(file) = files.get(dir) {
                return Ok(Arc::clone(file));
            }
        }
        let path = dir.join(LOCKS_FILE);
        let file = match lock::range::LockFile::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dir(dir)?;
                self.check_no_links(dir)?;
                lock::range::LockFile::open(&path)
            }
            other => other,
        }
        .map_err(|e| Error::io("opening the lock file", &path, e))?;
        let file = Arc::new(file);
        keep_open(&mut files, dir.to_path_buf(), &file);
        Ok(file)
    }

    /// Refuses folders below the layout folder that are symbolic links, so that nothing is read
    /// from or written outside the cache folder through one. Each folder is checked once per
    /// process.
    fn check_no_links(&self, dir: &Path) -> Result<(), Error> {
        let Ok(below) = dir.strip_prefix(&self.base) else {
            return Ok(());
        };
        let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
        if checked.contains(dir) {
            return Ok(());
        }
        let mut current = self.base.clone();
        for part in std::iter::once(None).chain(below.components().map(Some)) {
            if let Some(part) = part {
                current.push(part);
            }
            match fs::symlink_metadata(&current) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let error = io::Error::other(
                        "is a symbolic link; memo does not follow links inside its cache folder",
                    );
                    return Err(Error::io("using cache folder", current, error));
                }
                // A folder that does not exist yet is created as a real folder.
                Ok(_) | Err(_) => {}
            }
        }
        if dir.is_dir() {
            checked.insert(dir.to_path_buf());
        }
        Ok(())
    }

    #[cfg_attr(target_os = "linux", allow(dead_code))]
    fn lock_path(&self, at: &EntryAddress<'_>) -> PathBuf {
        let mut path = self.entry_path(at).into_os_string();
        path.push(LOCK_SUFFIX);
        PathBuf::from(path)
    }

    /// The shard folders (`<kk>`) of one version folder.
    fn shards(version_dir: &Path) -> Vec<PathBuf> {
        let Ok(read) = fs::read_dir(version_dir) else {
            return Vec::new();
        };
        read.flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                e.file_type().is_ok_and(|t| t.is_dir())
                    && name.len() == 2
                    && name.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .map(|e| e.path())
            .collect()
    }

    /// Every version folder: `<base>/<function>/<version>`.
    fn version_dirs(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let Ok(functions) = fs::read_dir(&self.base) else {
            return found;
        };
        for function in functions.flatten() {
            if !function.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(versions) = fs::read_dir(function.path()) {
                found.extend(
                    versions
                        .flatten()
                        .filter(|v| v.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|v| v.path()),
                );
            }
        }
        found
    }

    fn version_dir(&self, function: &str, version: &str) -> PathBuf {
        let short = version.get(..VERSION_DIR_DIGITS).unwrap_or(version);
        self.base.join(function).join(short)
    }

    /// `<base>/<function>/<version>/<kk>/<key>`, built in one allocation: it is on every hit.
    fn entry_path(&self, at: &EntryAddress<'_>) -> PathBuf {
        let hex = at.key.to_hex();
        let short = at.version.get(..VERSION_DIR_DIGITS).unwrap_or(at.version);
        let len = self.base.as_os_str().len() + at.function.len() + short.len() + 2 + hex.len();
        let mut path = PathBuf::with_capacity(len + 4);
        path.push(&self.base);
        path.push(at.function);
        path.push(short);
        path.push(&hex[..2]);
        path.push(&hex);
        path
    }

    /// Creates `dir` and its parents; when the root itself is new, marks it as a cache folder.
    fn create_dir(&self, dir: &Path) -> Result<(), Error> {
        if !self.base.is_dir() {
            let root_is_new = !self.root.exists();
            create_private_dir(&self.base)
                .map_err(|e| Error::io("creating cache folder", &self.base, e))?;
            if root_is_new {
                write_marker(&self.root.join(".gitignore"), b"*\n");
                write_marker(&self.root.join("CACHEDIR.TAG"), CACHEDIR_TAG);
            }
            write_marker(&self.base.join(".gitignore"), b"*\n");
        }
        create_private_dir(dir).map_err(|e| Error::io("creating cache folder", dir, e))
    }

    /// Writes `parts` as the file `path` in `dir`, atomically: on Linux an unnamed file linked
    /// into place when `path` does not exist yet, else a temporary file renamed over it.
    fn write_atomic(&self, dir: &Path, path: &Path, parts: &[&[u8]]) -> Result<(), Error> {
        self.check_no_links(dir)?;
        #[cfg(target_os = "linux")]
        {
            match unnamed::create(dir, path, parts, self.durable) {
                Ok(true) => return self.sync_dir(dir),
                // Present already, or not supported here: the portable way below.
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.create_dir(dir)?;
                    self.check_no_links(dir)?;
                    if let Ok(true) = unnamed::create(dir, path, parts, self.durable) {
                        return self.sync_dir(dir);
                    }
                }
                Err(e) => return Err(Error::io("writing cache entry", path, e)),
            }
        }
        let mut file = match tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dir(dir)?;
                self.check_no_links(dir)?;
                tempfile::Builder::new()
                    .prefix(TEMP_PREFIX)
                    .tempfile_in(dir)
                    .map_err(|e| Error::io("creating temporary file in", dir, e))?
            }
            Err(e) => return Err(Error::io("creating temporary file in", dir, e)),
        };
        for part in parts {
            file.write_all(part)
                .map_err(|e| Error::io("writing cache entry", file.path(), e))?;
        }
        if self.durable {
            file.as_file()
                .sync_all()
                .map_err(|e| Error::io("flushing to disk", file.path(), e))?;
        }
        // On failure the temporary file is removed when `file` drops: no partial entry remains.
        file.persist(path)
            .map_err(|e| Error::io("renaming cache entry into place at", path, e.error))?;
        self.sync_dir(dir)
    }
}

/// New entries written without a temporary name (Linux): the file is made unnamed in its folder
/// (`O_TMPFILE`), written, then given its name with `linkat`, which fails if the name exists. One
/// change to the folder instead of two (create, rename), and a crash leaves nothing behind.
#[cfg(target_os = "linux")]
mod unnamed {
    use std::ffi::CString;
    use std::fs::OpenOptions;
    use std::io::{self, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    /// Set when the file system (or the kernel) turned `O_TMPFILE` or `linkat` down once.
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

    /// Writes `parts` as the new file `path` in `dir`. `Ok(false)`: nothing was written, because
    /// `path` exists or this way is not available; the caller writes it the portable way.
    pub(super) fn create(
        dir: &Path,
        path: &Path,
        parts: &[&[u8]],
        durable: bool,
    ) -> io::Result<bool> {
        static PROC: OnceLock<bool> = OnceLock::new();
        if UNSUPPORTED.load(Ordering::Relaxed)
            || !*PROC.get_or_init(|| Path::new("/proc/self/fd").is_dir())
        {
            return Ok(false);
        }
        let mut file = match OpenOptions::new()
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let total: usize = parts.iter().map(|part| part.len()).sum();
        if total <= 64 * 1024 {
            // One write for a small entry.
            file.write_all(&parts.concat())?;
        } else {
            for part in parts {
                file.write_all(part)?;
            }
        }
        if durable {
            file.sync_all()?;
        }
        let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let target = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: two valid NUL-terminated paths that outlive the call.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                source.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if linked == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            // Present already, or its folder removed meanwhile: the portable way, this time.
            Some(libc::EEXIST | libc::ENOENT) => Ok(false),
            // A file system without links: the portable way from now on.
            Some(libc::EPERM | libc::EOPNOTSUPP | libc::EXDEV) => {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                Ok(false)
            }
            _ => Err(error),
        }
    }
}

const CACHEDIR_TAG: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by memo.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

fn write_marker(path: &Path, contents: &[u8]) {
    // Best effort: the markers help people and tools, the cache works without them.
    if let Ok(mut file) = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        let _ = file.write_all(contents);
    }
}

/// Creates a folder (and parents) readable only by the current user on Unix: cached results can
/// be as private as the data they were computed from.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn remove_dir(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing cache folder", dir, e)),
    }
}

/// Refuses a function or version name given from outside (an inspector's argument) that is not
/// a single plain path component: nothing may be listed or removed outside the cache folder.
pub(crate) fn plain_name(name: &str) -> Result<&str, Error> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).components().count() == 1;
    if plain {
        Ok(name)
    } else {
        let error = io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a function or version name of this cache",
        );
        Err(Error::io("looking up", name, error))
    }
}

/// A missing file, or a missing folder on the way (or a file where the folder should be).
fn is_absent(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// At most this many files of each kind (lock files, preview files) are kept open per store, so
/// that a program with many cached functions does not run out of file descriptors.
const KEEP_OPEN: usize = 32;

/// Keeps `file` open under `path`, closing the others first when [`KEEP_OPEN`] are open.
fn keep_open<T>(files: &mut HashMap<PathBuf, Arc<T>>, path: PathBuf, file: &Arc<T>) {
    if files.len() >= KEEP_OPEN {
        files.clear();
    }
    files.insert(path, Arc::clone(file));
}

/// One version as a backend lists it: function and version folder names, its source text (when
/// recorded) and its entries.
pub(crate) type ListedVersion = (String, String, Option<String>, Vec<EntryInfo>);

/// Groups listed versions by function, with each version's summary: functions by name, versions
/// most recently used first.
pub(crate) fn assemble_listing(listed: Vec<ListedVersion>) -> Vec<Listed> {
    // Per function: each version's summary with its entries, kept together while sorting.
    type Versions = Vec<(VersionInfo, Vec<EntryInfo>)>;
    let mut functions: Vec<(String, Versions)> = Vec::new();
    for (function, version, source, entries) in listed {
        let full_version = source.and_then(|text| {
            let first = text.lines().next()?;
            Some(first.rsplit(' ').next()?.to_owned())
        });
        let info = VersionInfo {
            version,
            full_version,
            entries: entries.len(),
            bytes: entries.iter().map(|e| e.size).sum(),
            last_used: entries.iter().map(|e| e.last_used).max(),
            compute_time: entries.iter().map(|e| e.duration).sum(),
        };
        match functions.iter_mut().find(|(name, _)| *name == function) {
            Some((_, versions)) => versions.push((info, entries)),
            None => functions.push((function, vec![(info, entries)])),
        }
    }
    functions.sort_by(|a, b| a.0.cmp(&b.0));
    functions
        .into_iter()
        .map(|(name, mut versions)| {
            // Most recently used first.
            versions.sort_by(|(a, _), (b, _)| {
                b.last_used
                    .cmp(&a.last_used)
                    .then(a.version.cmp(&b.version))
            });
            let (versions, entries) = versions.into_iter().unzip();
            Listed {
                info: FunctionInfo { name, versions },
                entries,
            }
        })
        .collect()
}

/// Opens an entry without following a symbolic link in its last component (nor waiting, should
/// a named pipe be in its place: it is then not a regular file, which readers check).
fn open_entry(path: &Path) -> io::Result<File> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NOFOLLOW | libc::O_NONBLOCK,
    );
    options.open(path).map_err(|e| {
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ELOOP) {
            return io::Error::other("is a symbolic link; memo does not follow links");
        }
        e
    })
}

/// Whether a file of memo's may be read through a memory map: not on a network or FUSE file
/// system, where a file that another machine removes (an eviction, a compaction) makes the
/// mapping's next page fault a `SIGBUS` that ends the process. There it is read instead.
pub(crate) fn may_map(file: &File) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::fd::AsRawFd;
        /// `f_type` of NFS, SMB, CIFS, SMB2, FUSE, Ceph, Lustre, GPFS, 9P, AFS and BeeGFS.
        const SHARED: [u32; 11] = [
            0x6969,
            0x517B,
            0xFF53_4D42,
            0xFE53_4D42,
            0x6573_5546,
            0x00C3_6400,
            0x0BD0_0BD0,
            0x4750_4653,
            0x0102_1997,
            0x5346_414F,
            0x1983_0326,
        ];
        // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
        let mut info: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor, and a pointer to a `statfs` that outlives the call.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut info) } != 0 {
            return false;
        }
        // (`f_type`'s width and sign differ between targets; the magic numbers are 32 bits.)
        #[allow(clippy::unnecessary_cast)]
        let kind = info.f_type as u32;
        !SHARED.contains(&kind)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = file;
        true
    }
}

/// The files of a shard folder; `None` when it is gone (another process cleared its version
/// since the folder was listed).
fn read_shard(shard: &Path) -> Result<Option<fs::ReadDir>, Error> {
    match fs::read_dir(shard) {
        Ok(read) => Ok(Some(read)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("listing cache folder", shard, e)),
    }
}

/// Reads a text file of memo's (a source, the previews) without following a link.
fn read_text(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open_entry(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// An entry's bytes as read: in memory, or mapped from its file (large entries). More ways of
/// holding them may come: match with a wildcard arm, or use the bytes through `Deref`.
#[non_exhaustive]
pub enum EntryBytes {
    /// Read into memory.
    Heap(Vec<u8>),
    /// Read into memory, for the first time in this process. The memory tier keeps a value
    /// only once it is read again: a process that reads each entry once (a new process going
    /// through a cache, a scan) neither pays for the tier's copy nor pushes out its hot values.
    FirstRead(Vec<u8>),
    /// Mapped read-only. memo never changes an entry file in place (entries are replaced by new
    /// files, and removed files stay readable while mapped), so the mapping is stable unless
    /// something outside memo truncates the file meanwhile.
    Mapped(memmap2::Mmap),
    /// A mapping shared with values that read it in place.
    Shared(Arc<memmap2::Mmap>),
}

impl std::ops::Deref for EntryBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            EntryBytes::Heap(bytes) | EntryBytes::FirstRead(bytes) => bytes,
            EntryBytes::Mapped(map) => map,
            EntryBytes::Shared(map) => map,
        }
    }
}

impl std::fmt::Debug for EntryBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            EntryBytes::Heap(_) => "Heap",
            EntryBytes::FirstRead(_) => "FirstRead",
            EntryBytes::Mapped(_) | EntryBytes::Shared(_) => "Mapped",
        };
        write!(f, "EntryBytes::{kind}({} bytes)", self.len())
    }
}

/// Entries at least this large are mapped instead of read: no copy into a fresh allocation.
const MAP_FROM: u64 = 4 << 20;

/// Reads an entry file. Small files are read whole; a larger one only when its header claims
/// exactly the length it has, and then into an allocation made fallibly (or mapped, from
/// [`MAP_FROM`] bytes on): a damaged or hostile header never causes a huge allocation. A file
/// whose header does not fit its length is returned cut to its first 64 KiB, for the decoder to
/// say what is wrong.
///
/// With `touch`, a read refreshes the file's modification time when it is older than
/// [`TOUCH_AFTER`], so that it says when the entry was last used.
fn read_entry_file(path: &Path, touch: bool) -> io::Result<EntryBytes> {
    let mut file = open_entry(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if touch {
        let now = SystemTime::now();
        let stale = meta
            .modified()
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > TOUCH_AFTER);
        if stale {
            // Best effort: an entry whose time cannot be set is simply older for eviction.
            let _ = file.set_modified(now);
        }
    }
    let len = meta.len();
    let whole = if len <= READ_WHOLE {
        len
    } else {
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header)?;
        let claimed = entry::decode_header(&header).map(|h| h.payload_len);
        let fits = claimed.is_ok_and(|n| n.checked_add(HEADER_LEN as u64) == Some(len));
        if fits && len >= MAP_FROM && may_map(&file) {
            // SAFETY: the file is mapped read-only and memo never writes to an entry file after it
            // is in place; the mapping lives as long as the bytes it is read through. (A process
            // outside memo truncating the file while it is mapped would fault the reader.)
            let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) };
            // (A file system that cannot map files is read instead.)
            if let Ok(map) = map {
                if map.len() as u64 == len {
                    return Ok(EntryBytes::Mapped(map));
                }
            }
        }
        let keep = if fits { len } else { READ_WHOLE };
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(keep as usize)
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "entry too large to load"))?;
        bytes.extend_from_slice(&header);
        (&mut file)
            .take(keep - HEADER_LEN as u64)
            .read_to_end(&mut bytes)?;
        return Ok(EntryBytes::Heap(bytes));
    };
    let mut bytes = Vec::with_capacity(whole as usize);
    file.take(whole).read_to_end(&mut bytes)?;
    Ok(EntryBytes::Heap(bytes))
}

/// Checks an entry file against the key its name gives.
fn verify_entry(path: &Path, name: &str) -> Result<(), String> {
    let key = decode_hex_key(name).ok_or_else(|| "not an entry file name".to_owned())?;
    let bytes = read_entry_file(path, false).map_err(|e| e.to_string())?;
    entry::decode(&bytes, &key)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The key an entry file's name spells, in the form memo writes (64 lower-case hex digits) and
/// no other.
pub(crate) fn decode_hex_key(name: &str) -> Option<CacheKey> {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if name.len() != 64 || !name.bytes().all(hex) {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(CacheKey::from_bytes(key))
}

impl Store for DirStore {
    fn describe(&self, at: &EntryAddress<'_>) -> PathBuf {
        self.entry_path(at)
    }

    fn version_location(&self, function: &str, version: &str) -> PathBuf {
        self.version_dir(function, version)
    }

    fn read(&self, at: &EntryAddress<'_>) -> Result<Option<EntryBytes>, Error> {
        #[cfg(unix)]
        {
            match self.packs_at(at)?.get_used(at.key) {
                Ok((Found::Absent, _)) => return Ok(None),
                Ok((Found::Entry(bytes), seen)) => {
                    self.note_use(at, seen.used);
                    return Ok(Some(if seen.again {
                        EntryBytes::Heap(bytes)
                    } else {
                        EntryBytes::FirstRead(bytes)
                    }));
                }
                Ok((Found::File, _)) => {}
                Err(e) => {
                    let dir = self
                        .version_dir(at.function, at.version)
                        .join(pack::PACK_DIR);
                    return Err(Error::io("reading a cache entry in the packs of", dir, e));
                }
            }
        }
        let path = self.entry_path(at);
        if let Some(dir) = path.parent() {
            self.check_no_links(dir)?;
        }
        match read_entry_file(&path, true) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(Error::io("reading cache entry", path, e)),
        }
    }

    fn contains(&self, at: &EntryAddress<'_>) -> bool {
        #[cfg(unix)]
        if let Ok(Some(recorded)) = self.packs_at(at).map(|packs| packs.contains(at.key)) {
            return recorded;
        }
        // A file of its own (or the packs could not be looked at: the file tells).
        self.entry_path(at).is_file()
    }

    fn lock(&self, at: &EntryAddress<'_>, timeout: Option<Duration>) -> Result<Acquired, Error> {
        let acquired = self.take_key_lock(at, timeout)?;
        // What is stored now is what the look-up under the lock must see: not a remembered
        // absence of the version's packs.
        #[cfg(unix)]
        if let Ok(packs) = self.packs_at(at) {
            packs.forget_absence();
        }
        Ok(acquired)
    }

    fn clean_version(
        &self,
        function: &str,
        version: &str,
        older_than: Duration,
    ) -> Result<Cleanup, Error> {
        let mut cleanup = Cleanup::default();
        let now = SystemTime::now();
        for shard in Self::shards(&self.version_dir(function, version)) {
            let Ok(read) = fs::read_dir(&shard) else {
                continue;
            };
            for item in read.flatten() {
                let name = item.file_name();
                let name = name.to_string_lossy();
                let old = item
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= older_than);
                if !old {
                    continue;
                }
                let path = item.path();
                if name.starts_with(TEMP_PREFIX) {
                    if fs::remove_file(&path).is_ok() {
                        cleanup.temporary_files += 1;
                    }
                } else if name.ends_with(LOCK_SUFFIX)
                    && lock::remove_if_abandoned(&path).unwrap_or(false)
                {
                    cleanup.lock_files += 1;
                }
            }
        }
        // Packs of processes that ended, merged (and their removed entries dropped) once there
        // are a few of them.
        #[cfg(unix)]
        pack::compact(&self.version_dir(function, version), 4).map_err(|e| {
            Error::io(
                "compacting the packs of",
                self.version_dir(function, version),
                e,
            )
        })?;
        Ok(cleanup)
    }

    fn versions(&self) -> Vec<(String, String)> {
        self.version_dirs()
            .into_iter()
            .filter_map(|dir| {
                let version = dir.file_name()?.to_string_lossy().into_owned();
                let function = dir.parent()?.file_name()?.to_string_lossy().into_owned();
                Some((function, version))
            })
            .collect()
    }

    fn listing(&self) -> Result<Vec<Listed>, Error> {
        let mut versions = Vec::new();
        for (function, version) in self.versions() {
            let entries = self.entries(&function, &version)?;
            let source = self.source(&function, &version).ok();
            versions.push((function, version, source, entries));
        }
        Ok(assemble_listing(versions))
    }

    fn source(&self, function: &str, version: &str) -> Result<String, Error> {
        let (function, version) = (plain_name(function)?, plain_name(version)?);
        let path = self.version_dir(function, version).join(SOURCE_FILE);
        read_text(&path).map_err(|e| Error::io("reading the source of", path, e))
    }

    fn entries(&self, function: &str, version: &str) -> Result<Vec<EntryInfo>, Error> {
        let (function, version) = (plain_name(function)?, plain_name(version)?);
        // What waits in memory is listed too.
        self.flush()?;
        let previews: HashMap<String, String> =
            read_text(&self.version_dir(function, version).join(PREVIEW_FILE))
                .unwrap_or_default()
                .lines()
                .filter_map(|line| {
                    let (key, preview) = line.split_once('\t')?;
                    Some((key.to_owned(), preview.to_owned()))
                })
                .collect();
        let mut entries = Vec::new();
        for shard in Self::shards(&self.version_dir(function, version)) {
            let Some(read) = read_shard(&shard)? else {
                continue;
            };
            for item in read.flatten() {
                let name = item.file_name().to_string_lossy().into_owned();
                if decode_hex_key(&name).is_none() {
                    continue;
                }
                let path = item.path();
                let Ok(meta) = item.metadata() else {
                    continue;
                };
                let mut header = [0u8; HEADER_LEN];
                let decoded = open_entry(&path)
                    .and_then(|mut f| f.read_exact(&mut header))
                    .ok()
                    .and_then(|()| entry::decode_header(&header).ok());
                let last_used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push(EntryInfo {
                    packed: false,
                    preview: previews.get(&name).cloned(),
                    key: name,
                    path,
                    created: decoded.map_or(SystemTime::UNIX_EPOCH, |h| h.created),
                    last_used,
                    duration: decoded.map_or(Duration::ZERO, |h| h.duration),
                    size: meta.len(),
                    readable: decoded.is_some(),
                });
            }
        }
        #[cfg(unix)]
        entries.extend(Self::packed_entries(&self.version_dir(function, version)));
        entries.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.cmp(&b.key)));
        Ok(entries)
    }

    fn verify(&self) -> Result<VerifyReport, Error> {
        self.flush()?;
        let mut report = VerifyReport::default();
        for version_dir in self.version_dirs() {
            for shard in Self::shards(&version_dir) {
                let Some(read) = read_shard(&shard)? else {
                    continue;
                };
                for item in read.flatten() {
                    let name = item.file_name().to_string_lossy().into_owned();
                    let path = item.path();
                    if name.starts_with(TEMP_PREFIX) {
                        report.temporary_files += 1;
                    } else if name.ends_with(LOCK_SUFFIX) {
                        report.lock_files += 1;
                    } else {
                        match verify_entry(&path, &name) {
                            Ok(()) => report.valid += 1,
                            Err(reason) => report.broken.push((path, reason)),
                        }
                    }
                }
            }
            #[cfg(unix)]
            {
                let contents = pack::contents(&version_dir, true);
                for packed in contents.entries {
                    match entry::decode(&packed.body, &packed.key) {
                        Ok(_) => report.valid += 1,
                        Err(reason) => {
                            let hex = packed.key.to_hex();
                            let path = version_dir.join(&hex[..2]).join(&hex);
                            report.broken.push((path, reason.to_string()));
                        }
                    }
                }
                report.broken.extend(contents.damaged);
            }
        }
        Ok(report)
    }

    fn write(
        &self,
        at: &EntryAddress<'_>,
        header: &[u8],
        payload: &[u8],
        preview: Option<&str>,
    ) -> Result<(), Error> {
        #[cfg(unix)]
        if (header.len() + payload.len()) as u64 <= self.pack_limit {
            // Quick results may wait in memory for a moment and go to the disk together: losing
            // them in a crash costs little to compute again. Not when every write must be
            // flushed to the disk, or its failure reported (strict mode).
            let quick =
                entry::decode_header(header).is_ok_and(|h| h.duration < crate::function::LOCK_FROM);
            let defer =
                quick && !self.durable && !self.strict.load(std::sync::atomic::Ordering::Relaxed);
            let body = [header, payload];
            return self.append(at, pack::Kind::Entry, &body, preview, defer);
        }
        let path = self.entry_path(at);
        let dir = path.parent().unwrap_or(&self.base).to_path_buf();
        self.write_atomic(&dir, &path, &[header, payload])?;
        if let Some(preview) = preview {
            // Best effort: an entry without its preview is still a complete entry.
            let _ = self.save_preview(at, preview);
        }
        // The packs' index says the entry is a file, so that look-ups need not try the file.
        #[cfg(unix)]
        self.append(at, pack::Kind::File, &[], None, false)?;
        Ok(())
    }

    fn touch(&self, at: &EntryAddress<'_>) {
        #[cfg(unix)]
        {
            if let Ok(packs) = self.packs_at(at) {
                if let Ok(Found::Entry(_)) = packs.get(at.key) {
                    // Best effort, as for a file.
                    let _ = self.append(at, pack::Kind::Used, &[], None, true);
                    return;
                }
            }
        }
        if let Ok(file) = open_entry(&self.entry_path(at)) {
            // Best effort, as for a read: an entry whose time cannot be set is older for eviction.
            let _ = file.set_modified(SystemTime::now());
        }
    }

    fn save_source(&self, function: &str, version: &str, text: &str) -> Result<(), Error> {
        let dir = self.version_dir(function, version);
        let path = dir.join(SOURCE_FILE);
        if path.is_file() {
            return Ok(());
        }
        self.write_atomic(&dir, &path, &[text.as_bytes()])
    }

    fn remove_version(&self, function: &str, version: &str) -> Result<(), Error> {
        let (function, version) = (plain_name(function)?, plain_name(version)?);
        self.forget_open_files();
        let dir = self.version_dir(function, version);
        let versions = [dir.clone()];
        self.retire(&versions);
        Self::remove_retired(&dir, &versions)
    }

    fn clear_function(&self, function: &str) -> Result<(), Error> {
        self.forget_open_files();
        let dir = self.base.join(plain_name(function)?);
        let versions: Vec<PathBuf> = self
            .version_dirs()
            .into_iter()
            .filter(|version| version.parent() == Some(&dir))
            .collect();
        self.retire(&versions);
        Self::remove_retired(&dir, &versions)
    }

    fn clear(&self) -> Result<(), Error> {
        self.forget_open_files();
        let versions = self.version_dirs();
        self.retire(&versions);
        Self::remove_retired(&self.base, &versions)
    }

    fn remove_entry(&self, path: &Path) -> Result<bool, Error> {
        // Only what a listing or a verification of this cache can name: a file of a version
        // folder (an entry, a pack), never anything else.
        let inside = path.strip_prefix(&self.base).is_ok_and(|below| {
            below.components().count() >= 3
                && below
                    .components()
                    .all(|part| matches!(part, std::path::Component::Normal(_)))
        });
        if !inside {
            return Err(Error::io(
                "removing cache entry",
                path,
                io::Error::other("not a file of this cache"),
            ));
        }
        #[cfg(unix)]
        if path
            .extension()
            .is_some_and(|e| pack::PACK_SUFFIX.strip_prefix('.') == Some(&*e.to_string_lossy()))
        {
            // A pack that `verify` found damaged: what follows the damage goes.
            return pack::repair(path).map_err(|e| Error::io("repairing pack", path, e));
        }
        let removed = match fs::remove_file(path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("removing cache entry", path, e)),
        };
        #[cfg(unix)]
        if let Some((function, short, key)) = self.packed_address(path) {
            let packs = self.packs_of(&function, &short)?;
            if let Ok(Found::Entry(_)) = packs.get(&key) {
                let at = EntryAddress {
                    function: &function,
                    version: &short,
                    key: &key,
                };
                self.append(&at, pack::Kind::Removed, &[], None, false)?;
                return Ok(true);
            }
        }
        Ok(removed)
    }

    fn still_broken(&self, path: &Path) -> bool {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if path.is_file() {
            // (A damaged pack is no entry: `remove_entry` repairs only a damage still there.)
            return name.is_none_or(|name| verify_entry(path, &name).is_err());
        }
        #[cfg(unix)]
        if let Some((function, short, key)) = self.packed_address(path) {
            return match self
                .packs_of(&function, &short)
                .map(|packs| packs.get(&key))
            {
                Ok(Ok(Found::Entry(bytes))) => entry::decode(&bytes, &key).is_err(),
                // Gone, or never there: nothing broken to remove.
                Ok(Ok(Found::Absent | Found::File)) => false,
                Ok(Err(_)) | Err(_) => true,
            };
        }
        true
    }

    fn set_strict(&self, strict: bool) {
        self.strict
            .store(strict, std::sync::atomic::Ordering::Relaxed);
    }

    fn flush(&self) -> Result<(), Error> {
        #[cfg(unix)]
        {
            let all: Vec<Arc<Packs>> = {
                let map = self.packs.read().unwrap_or_else(PoisonError::into_inner);
                map.values()
                    .flat_map(|list| list.iter().map(|(_, packs)| Arc::clone(packs)))
                    .collect()
            };
            for packs in all {
                packs
                    .flush()
                    .map_err(|e| Error::io("writing to the packs of", packs.dir(), e))?;
            }
        }
        Ok(())
    }

    fn compact(&self) {
        let _ = self.flush();
        #[cfg(unix)]
        for dir in self.version_dirs() {
            if let Err(error) = pack::compact(&dir, 2) {
                tracing::debug!(target: "memo", "compacting the packs of {}: {error}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_outside_cannot_leave_the_cache_folder() {
        for bad in ["", ".", "..", "../x", "a/b", "/etc", "a\\b", "a\0b"] {
            assert!(plain_name(bad).is_err(), "{bad:?}");
        }
        assert!(plain_name("my_crate.physics.simulate").is_ok());
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let store = DirStore::new(outside.path().join("cache"));
        assert!(store.clear_function("../../victim").is_err());
        assert!(victim.exists());
    }

    #[test]
    fn only_files_of_the_cache_are_removed_as_entries() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let store = DirStore::new(outside.path().join("cache"));
        assert!(store.remove_entry(&victim).is_err());
        let climbing = store.base.join("f/v/kk/../../../../../victim");
        assert!(store.remove_entry(&climbing).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn files_on_a_local_file_system_may_be_mapped() {
        let file = tempfile::tempfile().unwrap();
        assert!(may_map(&file));
    }

    #[test]
    fn only_names_memo_writes_are_entry_names() {
        let key = CacheKey::from_bytes([0xab; 32]);
        let name = key.to_hex();
        assert_eq!(decode_hex_key(&name), Some(key));
        assert_eq!(decode_hex_key(&name.to_uppercase()), None);
        // `u8::from_str_radix` takes a sign: "+a" is 10.
        assert_eq!(decode_hex_key(&format!("+a{}", &name[2..])), None);
        assert_eq!(decode_hex_key(&name[1..]), None);
    }

    #[test]
    fn function_dir_names_are_readable_and_injective() {
        assert_eq!(function_dir_name("my_crate::a::f"), "my_crate.a.f");
        assert_eq!(function_dir_name("c::résumé"), "c.r%C3%A9sum%C3%A9");
        assert_ne!(function_dir_name("a::b_c"), function_dir_name("a_b::c"));
    }

    #[test]
    fn entry_paths_follow_the_documented_layout() {
        let store = DirStore::new(PathBuf::from("/cache"));
        let key = CacheKey::from_bytes([0xab; 32]);
        let version = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let path = store.entry_path(&EntryAddress {
            function: "k.f",
            version,
            key: &key,
        });
        let hex = "ab".repeat(32);
        assert_eq!(
            path,
            PathBuf::from(format!("/cache/v1/k.f/0123456789abcdef/ab/{hex}"))
        );
    }

    #[cfg(unix)]
    #[test]
    fn reading_a_packed_entry_last_used_long_ago_records_its_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path().to_path_buf());
        let key = CacheKey::from_bytes([3; 32]);
        let version = format!("{:064x}", 7);
        let at = EntryAddress {
            function: "k.f",
            version: &version,
            key: &key,
        };
        // An entry written two hours ago by a process that has ended.
        let folder = store.version_dir("k.f", &version);
        std::fs::create_dir_all(folder.join(pack::PACK_DIR)).unwrap();
        std::fs::write(folder.join(pack::GENERATION_FILE), [0u8; 16]).unwrap();
        let long_ago = pack::now_nanos() - 2 * 3600 * 1_000_000_000;
        let record = pack::encode(pack::Kind::Entry, long_ago, &key, &[b"entry"], b"");
        std::fs::write(folder.join(pack::PACK_DIR).join("1-0.pack"), record).unwrap();
        let last_used = || {
            let contents = pack::contents(&folder, false);
            assert_eq!(contents.entries.len(), 1);
            contents.entries[0].last_used
        };
        assert_eq!(last_used(), long_ago);

        assert_eq!(&*store.read(&at).unwrap().unwrap(), b"entry");
        store.flush().unwrap();
        let noted = last_used();
        assert!(
            noted > long_ago + 3600 * 1_000_000_000,
            "{noted} vs {long_ago}"
        );
        // Once: a use recorded just now is not recorded again.
        store.read(&at).unwrap().unwrap();
        store.flush().unwrap();
        assert_eq!(last_used(), noted);
        // A later look at the folder, after its writer ended, still sees it.
        drop(store);
        pack::compact(&folder, 1).unwrap();
        assert_eq!(last_used(), noted);
    }

    #[cfg(unix)]
    #[test]
    fn a_thread_does_not_keep_using_the_packs_of_a_removed_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path().to_path_buf());
        let other = DirStore::new(dir.path().to_path_buf());
        let short = "0123456789abcdef";
        let first = store.packs_of("k.f", short).unwrap();
        // The thread's copy answers again, for this store only.
        assert!(Arc::ptr_eq(&first, &store.packs_of("k.f", short).unwrap()));
        assert!(!Arc::ptr_eq(&first, &other.packs_of("k.f", short).unwrap()));
        assert!(Arc::ptr_eq(&first, &store.packs_of("k.f", short).unwrap()));
        assert!(!Arc::ptr_eq(&first, &store.packs_of("k.g", short).unwrap()));
        assert!(Arc::ptr_eq(&first, &store.packs_of("k.f", short).unwrap()));
        store.retire(&[store.version_dir("k.f", short)]);
        let after = store.packs_of("k.f", short).unwrap();
        assert!(!Arc::ptr_eq(&first, &after));
        assert!(Arc::ptr_eq(&after, &store.packs_of("k.f", short).unwrap()));
    }

    #[test]
    fn many_versions_keep_few_files_open_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path().to_path_buf()).pack_limit(0);
        let key = CacheKey::from_bytes([7; 32]);
        let versions: Vec<String> = (0..3 * KEEP_OPEN)
            .map(|i| format!("{i:016x}{}", "0".repeat(48)))
            .collect();
        for round in 0..2 {
            for version in &versions {
                let at = EntryAddress {
                    function: "k.f",
                    version,
                    key: &key,
                };
                let preview = format!("round {round}");
                store
                    .write(&at, b"header", b"payload", Some(&preview))
                    .unwrap();
                #[cfg(target_os = "linux")]
                match store.lock(&at, None).unwrap() {
                    Acquired::Lock { waited, .. } => assert!(!waited),
                    Acquired::TimedOut => panic!("no one else holds it"),
                }
            }
        }
        assert!(store.preview_files.lock().unwrap().len() <= KEEP_OPEN);
        #[cfg(target_os = "linux")]
        assert!(store.lock_files.lock().unwrap().len() <= KEEP_OPEN);
        #[cfg(unix)]
        assert!(store.packs.read().unwrap().len() <= 2 * KEEP_OPEN);
        for version in &versions {
            let folder = store.version_dir("k.f", version);
            let previews = std::fs::read_to_string(folder.join(PREVIEW_FILE)).unwrap();
            assert_eq!(previews.lines().count(), 2, "{version}");
        }
    }
}
