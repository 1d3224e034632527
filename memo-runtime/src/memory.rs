//! [`Memory`]: where a cache lives and how it behaves.

use std::collections::HashSet;
use std::env;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::error::Error;
use crate::flight::InFlight;
use crate::gc::{self, GcReport, Limits};
use crate::inventory::{EntryInfo, FunctionInfo};
use crate::store::{Cleanup, DirStore, Store, VerifyReport, DEFAULT_PACK_LIMIT, MAX_PACK_LIMIT};
use crate::tier::Tier;

/// Whether `location` names a remote store (`scheme://...`) rather than a folder.
fn is_url(location: &str) -> bool {
    location.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

/// Temporary and lock files older than this are removed by the automatic clean-up.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// How long a process waits, by default, for another process computing the same key.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(3600);

/// The default size of the in-process memory tier ([`Memory::memory_tier`]): 64 MiB.
pub const DEFAULT_MEMORY_TIER: u64 = 64 << 20;

/// Environment variable naming the cache folder of [`Memory::from_env`] (and so of every
/// `#[cached]` function without a `memory = ...` option).
pub const MEMO_DIR: &str = "MEMO_DIR";
/// Environment variable that turns every cache off when set to anything but `""`, `0`, `false`,
/// `no` or `off`: cached functions then simply run, like joblib's `location=None`.
pub const MEMO_DISABLE: &str = "MEMO_DISABLE";

/// A cache: a storage location plus its settings.
///
/// Most programs never build one: `#[cached]` uses [`Memory::global`], which reads [`MEMO_DIR`]
/// and falls back to [`Memory::default_location`]. Build your own to keep a function's cache
/// elsewhere, and select it with `#[cached(memory = EXPR)]`, where `EXPR` is a `Memory`, a
/// reference to one, or a `LazyLock`/`Arc`/`Box` of one:
///
/// ```
/// use std::sync::LazyLock;
/// use memo_runtime::Memory;
///
/// static SCRATCH: LazyLock<Memory> =
///     LazyLock::new(|| Memory::new(std::env::temp_dir().join("memo-doc-scratch")));
/// assert!(SCRATCH.location().is_some());
/// ```
///
/// A `Memory` is meant to live as long as the program (a `static`): simultaneous misses on one
/// key are computed once only among the calls that share the same `Memory` value.
pub struct Memory {
    location: Option<PathBuf>,
    store: Option<Arc<dyn Store>>,
    strict: bool,
    lock_timeout: Option<Duration>,
    compression: Option<i32>,
    bytes_limit: Option<u64>,
    /// Bytes stored since the last automatic size check.
    stored_since_check: AtomicU64,
    pub(crate) flights: InFlight,
    pub(crate) counters: Counters,
    /// Function versions (by their number in this process) whose source is already recorded.
    sources_saved: Mutex<HashSet<usize, rustc_hash::FxBuildHasher>>,
    /// Recently used payloads, in memory; `None` when turned off.
    pub(crate) tier: Option<Tier>,
    tier_size: u64,
    durable: bool,
    /// Entries up to this size are appended to packs ([`Memory::pack_limit`]).
    pack_limit: u64,
    /// With a remote store: the local folder in front of it, where the size limit applies.
    local_tier: Option<Arc<dyn Store>>,
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memory")
            .field("location", &self.location)
            .field("enabled", &self.is_enabled())
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    /// Hits other than memory hits (which [`Memory::stats`] adds).
    pub(crate) hits: Striped,
    pub(crate) misses: Striped,
    pub(crate) stores: Striped,
    pub(crate) errors: Striped,
    pub(crate) memory_hits: Striped,
}

impl Counters {
    pub(crate) fn bump(counter: &Striped) {
        counter.bump();
    }
}

/// A counter in several cache lines, summed when read: threads hitting the cache at once do not
/// pass one line back and forth (a hit from memory takes a tenth of a microsecond; a contended
/// line costs about as much). The first [`OWNED`] threads alive each have a stripe of their own,
/// which they bump with a plain load and store: an atomic add would wait for every store the
/// hit made before it (a twentieth of a hit). Other threads share the last stripe.
#[derive(Default)]
pub(crate) struct Striped([Stripe; OWNED + 1]);

#[derive(Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

/// How many threads at a time have a stripe of their own.
const OWNED: usize = 8;

/// Which owned stripes threads hold now.
static TAKEN: Mutex<[bool; OWNED]> = Mutex::new([false; OWNED]);

/// A thread's stripe: its own while it lives (given back when it ends), or the shared one.
struct Owner(usize);

impl Owner {
    fn claim() -> Self {
        let mut taken = TAKEN.lock().unwrap_or_else(PoisonError::into_inner);
        match taken.iter().position(|&t| !t) {
            Some(free) => {
                taken[free] = true;
                Owner(free)
            }
            None => Owner(OWNED),
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if self.0 < OWNED {
            // The next owner takes it through this lock, after every bump of this thread.
            TAKEN.lock().unwrap_or_else(PoisonError::into_inner)[self.0] = false;
        }
    }
}

impl Striped {
    fn bump(&self) {
        thread_local! {
            static MINE: Owner = Owner::claim();
        }
        // While the thread's own values are dropped, the shared stripe.
        let stripe = MINE.try_with(|mine| mine.0).unwrap_or(OWNED);
        let count = &self.0[stripe].0;
        if stripe < OWNED {
            // No other thread writes this stripe while this one holds it.
            count.store(
                count.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
        } else {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|stripe| stripe.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Counts of what a [`Memory`] did in this process, from [`Memory::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls answered from the cache (including those that waited for another thread).
    pub hits: u64,
    /// Calls that computed their value.
    pub misses: u64,
    /// Values written to the cache.
    pub stores: u64,
    /// Problems met and tolerated: unreadable or broken entries, failed writes.
    pub errors: u64,
    /// Of the hits, those answered by the in-process memory tier without reading the disk.
    pub memory_hits: u64,
}

impl Memory {
    /// A cache in the folder `location`, created on the first store.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/my-project-cache");
    /// assert_eq!(memory.location(), Some(std::path::Path::new("/tmp/my-project-cache")));
    /// ```
    pub fn new(location: impl Into<PathBuf>) -> Self {
        let location = location.into();
        let store: Arc<dyn Store> = Arc::new(DirStore::new(location.clone()));
        Memory::build(Some(location), Some(store))
    }

    /// A cache that stores nothing: cached functions simply run.
    ///
    /// ```
    /// assert!(!memo_runtime::Memory::disabled().is_enabled());
    /// ```
    pub fn disabled() -> Self {
        Memory::build(None, None)
    }

    fn build(location: Option<PathBuf>, store: Option<Arc<dyn Store>>) -> Self {
        Memory {
            location,
            store,
            strict: false,
            lock_timeout: Some(DEFAULT_LOCK_TIMEOUT),
            compression: None,
            bytes_limit: None,
            stored_since_check: AtomicU64::new(0),
            flights: InFlight::default(),
            counters: Counters::default(),
            sources_saved: Mutex::default(),
            tier: Tier::new(DEFAULT_MEMORY_TIER),
            tier_size: DEFAULT_MEMORY_TIER,
            durable: false,
            pack_limit: DEFAULT_PACK_LIMIT,
            local_tier: None,
        }
    }

    /// The cache at `location`: a folder, or with the `remote` feature a URL such as
    /// `s3://bucket/prefix` (then configured by `remote::RemoteConfig::from_env`); an error
    /// names what is wrong with a URL.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::at("/tmp/my-project-cache").unwrap();
    /// assert!(memory.remote_url().is_none());
    /// ```
    pub fn at(location: &str) -> Result<Self, Error> {
        if !is_url(location) {
            return Ok(Memory::new(location));
        }
        #[cfg(feature = "remote")]
        {
            crate::remote::RemoteConfig::from_env(location).build()
        }
        #[cfg(not(feature = "remote"))]
        Err(Error::Config {
            message: format!(
                "`{location}` is a remote store, and memo was built without its `remote` feature"
            ),
        })
    }

    /// A cache shared through a remote store, with a local folder in front of it; see
    /// [`RemoteConfig`](crate::remote::RemoteConfig) and `docs/REMOTE.md`.
    ///
    /// Values are read from the local folder first and written to both. What manages a cache
    /// works on the shared, remote store: [`Memory::functions`], [`Memory::entries`] and
    /// [`Memory::verify`] list and check it, [`Memory::reduce_size`] (the inspector's `gc`)
    /// evicts from it for every machine, [`Memory::clear`] and [`Memory::clear_function`] empty
    /// it and the local folder. The size
    /// limit of the local folder ([`Memory::bytes_limit`], from
    /// [`RemoteConfig::local_limit`](crate::remote::RemoteConfig::local_limit)) is enforced on
    /// it alone; [`Memory::location`] is that folder.
    #[cfg(feature = "remote")]
    pub fn remote(config: crate::remote::RemoteConfig) -> Result<Self, Error> {
        let tiered = config.open()?;
        let local: Arc<dyn Store> = Arc::clone(&tiered.local) as Arc<dyn Store>;
        let (local_dir, local_limit) = (tiered.local_dir.clone(), tiered.local_limit);
        let mut memory = Memory::build(Some(local_dir), Some(Arc::new(tiered)));
        memory.local_tier = Some(local);
        memory.bytes_limit = local_limit;
        Ok(memory)
    }

    /// The URL of the remote store behind the local folder, for a remote cache.
    pub fn remote_url(&self) -> Option<&str> {
        self.store.as_deref().and_then(|store| store.remote_url())
    }

    /// The size of the in-process memory tier, in bytes: recently used values are kept in memory
    /// (as their encoded bytes, looked up by the call's exact encoded arguments when they are
    /// short, else by its full 256-bit key) so that a repeated call in the same process does not
    /// read the disk. Values larger than 1/128 of it are always read
    /// from disk. `0` turns it off. Default: [`DEFAULT_MEMORY_TIER`] (64 MiB).
    ///
    /// The tier serves what this process stored or read (a small, packed value from its second
    /// read on: a value read once is not worth the copy); an entry deleted on disk by another
    /// process (or by hand) is still served from memory until it is pushed out or this process
    /// clears it (`f::clear()`, [`Memory::clear`]). Expiry (`expire = ...`) and validation
    /// callbacks are checked on every hit, in memory too.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/cache").memory_tier(0);
    /// assert_eq!(memory.memory_tier_size(), 0);
    /// ```
    pub fn memory_tier(mut self, bytes: u64) -> Self {
        self.tier = Tier::new(bytes);
        self.tier_size = bytes;
        self
    }

    /// The size of the memory tier in bytes (`0`: off).
    pub fn memory_tier_size(&self) -> u64 {
        if self.tier.is_some() {
            self.tier_size
        } else {
            0
        }
    }

    /// The cache configured by the environment: disabled when [`MEMO_DISABLE`] is set, else in
    /// [`MEMO_DIR`] when it is set and not empty, else in [`Memory::default_location`].
    pub fn from_env() -> Self {
        if disabled_by_env() {
            return Memory::disabled();
        }
        match env::var_os(MEMO_DIR) {
            Some(dir) if dir.to_str().is_some_and(is_url) => {
                let url = dir.to_string_lossy();
                Memory::at(&url).unwrap_or_else(|error| {
                    let fallback = Memory::default_location();
                    crate::log::warn(&format!(
                        "{MEMO_DIR}: {error}; caching in {} instead",
                        fallback.display()
                    ));
                    Memory::new(fallback)
                })
            }
            // Made absolute now: the cache stays where it was named should the program change
            // its current folder later.
            Some(dir) if !dir.is_empty() => Memory::new(absolute(PathBuf::from(dir))),
            _ => Memory::new(absolute(Memory::default_location())),
        }
    }

    /// The cache used by `#[cached]` functions that do not name one: [`Memory::from_env`],
    /// read once, at the first call.
    pub fn global() -> &'static Memory {
        static GLOBAL: OnceLock<Memory> = OnceLock::new();
        GLOBAL.get_or_init(Memory::from_env)
    }

    /// The default cache folder when [`MEMO_DIR`] is not set: `memo` in the user's cache folder
    /// (`$XDG_CACHE_HOME/memo` or `~/.cache/memo` on Linux, `~/Library/Caches/memo` on macOS,
    /// `%LOCALAPPDATA%\memo` on Windows), or `.memo-cache` in the current folder when the system
    /// names no cache folder.
    ///
    /// It depends neither on the executable's name nor on how it was started, so `cargo run`,
    /// `cargo test` and a renamed binary share their results (entries are filed by the crate and
    /// module that define each function).
    pub fn default_location() -> PathBuf {
        match dirs::cache_dir() {
            Some(dir) => dir.join("memo"),
            None => PathBuf::from(".memo-cache"),
        }
    }

    /// Strict mode: problems with the cache (an entry that cannot be written, a broken entry,
    /// an argument that cannot be hashed) make the call panic with the error, instead of being
    /// logged as a warning while the value is computed and returned. For pipelines where a
    /// silently cold cache is worse than a stop.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/strict-cache").strict(true);
    /// assert!(memory.is_strict());
    /// ```
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        if let Some(store) = &self.store {
            store.set_strict(strict);
        }
        self
    }

    /// Whether strict mode is on.
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// How long a call waits for another process that is computing the same key before it
    /// computes the value itself; `None` waits as long as that process lives. Default: one hour
    /// ([`DEFAULT_LOCK_TIMEOUT`]). A process that dies releases its keys at once, so the timeout
    /// only matters for one that hangs.
    ///
    /// ```
    /// use std::time::Duration;
    /// let memory = memo_runtime::Memory::new("/tmp/cache").lock_timeout(Some(Duration::from_secs(60)));
    /// assert_eq!(memory.lock_timeout_value(), Some(Duration::from_secs(60)));
    /// ```
    pub fn lock_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Durable writes: each entry is flushed to the disk (`fsync` of the file before it is
    /// named, then of its folder) before the call returns, so a stored result survives a power
    /// failure or a kernel crash, at the cost of a disk flush per miss (milliseconds on many
    /// disks, see `docs/BENCHMARKS.md`). Off by default: without it a result survives any crash
    /// of the process, and a power failure can only lose recent entries, never tear one (a torn
    /// entry fails its checksum and is a miss).
    ///
    /// A setting of local caches: on a remote cache ([`Memory::remote_url`]) it is ignored (the
    /// object store decides the remote durability) and [`Memory::is_durable`] stays `false`.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/cache").durable(true);
    /// assert!(memory.is_durable());
    /// ```
    pub fn durable(mut self, durable: bool) -> Self {
        if self.remote_url().is_some() {
            return self;
        }
        self.durable = durable;
        self.rebuild_store();
        self
    }

    /// The folder store again, after a setting of it changed.
    fn rebuild_store(&mut self) {
        if let Some(location) = &self.location {
            let store = DirStore::new(location.clone())
                .durable(self.durable)
                .pack_limit(self.pack_limit);
            store.set_strict(self.strict);
            self.store = Some(Arc::new(store));
        }
    }

    /// Appends entries of up to `bytes` bytes (the 72-byte header and the payload) to packs:
    /// files shared by the entries of a function version, one written by each process, instead
    /// of a file per entry. The default, [`DEFAULT_PACK_LIMIT`] (16 KiB), makes a small miss
    /// cost one append instead of a new file, and a new process read a version's small entries
    /// with a few reads; `0` gives every entry a file of its own. Larger entries always have
    /// their own file (read mapped), and so do entries over [`MAX_PACK_LIMIT`] (64 MiB) whatever
    /// the setting. Packs are Unix only: elsewhere every entry has a file.
    ///
    /// Packed entries are read, listed, verified and evicted like the others; the space of
    /// evicted ones is reclaimed when the packs of processes that ended are merged (by the size
    /// limit's eviction, and by the clean-up a process runs on a version's first use).
    ///
    /// A setting of local caches, ignored on a remote one.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/cache").pack_limit(0);
    /// assert_eq!(memory.pack_limit_value(), 0);
    /// ```
    pub fn pack_limit(mut self, bytes: u64) -> Self {
        if self.remote_url().is_some() {
            return self;
        }
        self.pack_limit = bytes.min(MAX_PACK_LIMIT);
        self.rebuild_store();
        self
    }

    /// Writes out the results of quick computations still waiting in memory. Such results
    /// (computed in under [`LOCK_FROM`](crate::function::LOCK_FROM), stored in packs, neither
    /// durable nor strict) go to the disk together, within [`FLUSH_AFTER`](crate::pack::FLUSH_AFTER)
    /// (2 ms) or when the process exits normally; this process sees them at once. Call it before
    /// handing the cache to another program at a known moment; a process killed without it
    /// loses at most those last milliseconds of quick results, which are computed again.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new(std::env::temp_dir().join("memo-doc-flush"));
    /// memory.flush().unwrap();
    /// ```
    pub fn flush(&self) -> Result<(), Error> {
        match self.store() {
            Some(store) => store.flush(),
            None => Ok(()),
        }
    }

    /// The pack limit in force; see [`Memory::pack_limit`].
    pub fn pack_limit_value(&self) -> u64 {
        self.pack_limit
    }

    /// Whether writes are durable ([`Memory::durable`]).
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Compresses entries with zstd at `level` (1 fast .. 19 small; 3 is zstd's default), or not
    /// at all with `None` (the default). Recorded in each entry's header, so compressed and plain
    /// entries mix freely; a function's `#[cached(compress = ...)]` overrides it.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/cache").compression(Some(3));
    /// assert_eq!(memory.compression_level(), Some(3));
    /// ```
    pub fn compression(mut self, level: Option<i32>) -> Self {
        self.compression = level;
        self
    }

    /// The compression level in force; see [`Memory::compression`].
    pub fn compression_level(&self) -> Option<i32> {
        self.compression
    }

    /// Keeps the cache under `bytes` bytes of entries: as stores add up (every tenth of the
    /// limit, or 1 MiB, whichever is larger), the least recently used entries are evicted on a
    /// thread of its own, and each eviction is listed in `v1/evictions.log`. Between two checks
    /// the cache may grow past the limit by that interval. No limit by default: memo never drops
    /// results you did not ask it to.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new("/tmp/cache").bytes_limit(Some(2 << 30));
    /// assert_eq!(memory.bytes_limit_value(), Some(2 << 30));
    /// ```
    pub fn bytes_limit(mut self, bytes: Option<u64>) -> Self {
        self.bytes_limit = bytes;
        self
    }

    /// The size limit in force; see [`Memory::bytes_limit`].
    pub fn bytes_limit_value(&self) -> Option<u64> {
        self.bytes_limit
    }

    /// Evicts entries, least recently used first, and prunes old versions until the cache is
    /// within `limits` (like joblib's `reduce_size`); every eviction is appended to
    /// `v1/evictions.log`. With `limits.dry_run`, only lists what would go.
    ///
    /// ```
    /// use std::time::Duration;
    /// use memo_runtime::{gc::Limits, Memory};
    ///
    /// let memory = Memory::new(std::env::temp_dir().join("memo-doc-gc"));
    /// let limits = Limits::new().max_age(Duration::from_secs(30 * 86_400)).dry_run(true);
    /// let report = memory.reduce_size(&limits).unwrap();
    /// println!("{} entries would go", report.evicted.len());
    /// ```
    pub fn reduce_size(&self, limits: &Limits) -> Result<GcReport, Error> {
        match (&self.store, &self.location) {
            (Some(store), Some(location)) => gc::reduce_size(&**store, location, limits),
            _ => Ok(GcReport::default()),
        }
    }

    /// What was evicted so far, oldest first, from `v1/evictions.log`.
    pub fn evictions(&self) -> Result<Vec<gc::LoggedEviction>, Error> {
        match &self.location {
            Some(location) if self.store.is_some() => gc::read_log(location),
            _ => Ok(Vec::new()),
        }
    }

    /// Counts `bytes` just stored; past the check interval of [`Memory::bytes_limit`], enforces
    /// the limit in the background.
    pub(crate) fn note_stored(&self, bytes: u64) {
        let Some(limit) = self.bytes_limit else {
            return;
        };
        let since = self.stored_since_check.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if since < gc::check_interval(limit) {
            return;
        }
        self.stored_since_check.store(0, Ordering::Relaxed);
        let store = self.local_tier.clone().or_else(|| self.store.clone());
        if let (Some(store), Some(location)) = (store, self.location.clone()) {
            gc::enforce_in_background(store, location, limit);
        }
    }

    /// The lock timeout in force; see [`Memory::lock_timeout`].
    pub fn lock_timeout_value(&self) -> Option<Duration> {
        self.lock_timeout
    }

    /// Checks every stored entry (header, key, checksum) without decoding it, and counts the
    /// temporary and lock files present. A disabled cache reports nothing.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new(std::env::temp_dir().join("memo-doc-verify"));
    /// let report = memory.verify().unwrap();
    /// assert!(report.broken.is_empty());
    /// ```
    pub fn verify(&self) -> Result<VerifyReport, Error> {
        match &self.store {
            Some(store) => store.verify(),
            None => Ok(VerifyReport::default()),
        }
    }

    /// The cache folder, or `None` for a disabled cache.
    pub fn location(&self) -> Option<&Path> {
        self.location.as_deref()
    }

    /// Whether this cache stores and serves values: it has a location and [`MEMO_DISABLE`] is
    /// not set.
    pub fn is_enabled(&self) -> bool {
        self.store.is_some() && !disabled_by_env()
    }

    /// What this cache did in this process so far.
    pub fn stats(&self) -> Stats {
        let load = Striped::get;
        Stats {
            hits: load(&self.counters.hits) + load(&self.counters.memory_hits),
            misses: load(&self.counters.misses),
            stores: load(&self.counters.stores),
            errors: load(&self.counters.errors),
            memory_hits: load(&self.counters.memory_hits),
        }
    }

    /// Removes every stored entry of every function, all versions.
    ///
    /// ```
    /// let dir = std::env::temp_dir().join("memo-doc-clear");
    /// let memory = memo_runtime::Memory::new(&dir);
    /// memory.clear().unwrap();
    /// ```
    pub fn clear(&self) -> Result<(), Error> {
        self.removing(|store| store.clear())
    }

    /// Runs a removal on the store (if any), in the order removals need: the sources recorded
    /// are forgotten first (the next store records them again), the memory tier emptied after
    /// the disk (a value read from it meanwhile is not kept).
    fn removing(&self, remove: impl FnOnce(&dyn Store) -> Result<(), Error>) -> Result<(), Error> {
        self.forget_saved_sources();
        let removed = self.store.as_deref().map_or(Ok(()), remove);
        self.forget_in_memory();
        removed
    }

    /// Removes the broken entries a [`Memory::verify`] report lists (each would be a miss anyway)
    /// that are broken still: one stored again since the report (by a program running meanwhile)
    /// is kept. Returns how many were removed.
    pub fn remove_broken(&self, report: &VerifyReport) -> Result<usize, Error> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut removed = 0;
        // An entry stored again since the verification (by a program running meanwhile) stays.
        for (path, _) in report
            .broken
            .iter()
            .filter(|(path, _)| store.still_broken(path))
        {
            removed += usize::from(store.remove_entry(path)?);
        }
        Ok(removed)
    }

    /// Every function stored in this cache, with its versions, entry counts, sizes, last use and
    /// stored compute time, sorted by name. A disabled cache holds nothing.
    ///
    /// ```
    /// let memory = memo_runtime::Memory::new(std::env::temp_dir().join("memo-doc-functions"));
    /// for function in memory.functions().unwrap() {
    ///     println!("{}: {} entries, {} bytes", function.name, function.entries(), function.bytes());
    /// }
    /// ```
    pub fn functions(&self) -> Result<Vec<FunctionInfo>, Error> {
        match &self.store {
            Some(store) => Ok(store.listing()?.into_iter().map(|l| l.info).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// The source text a version of a function was compiled from (names as
    /// [`Memory::functions`] gives them), with a first line naming the function and its full
    /// version hash.
    pub fn source(&self, function: &str, version: &str) -> Result<String, Error> {
        match &self.store {
            Some(store) => store.source(function, version),
            None => Ok(String::new()),
        }
    }

    /// The entries of one version of a function (names as [`Memory::functions`] gives them),
    /// most recently used first.
    pub fn entries(&self, function: &str, version: &str) -> Result<Vec<EntryInfo>, Error> {
        match &self.store {
            Some(store) => store.entries(function, version),
            None => Ok(Vec::new()),
        }
    }

    /// Removes every entry of one function (a name as [`Memory::functions`] gives it), all
    /// versions.
    pub fn clear_function(&self, function: &str) -> Result<(), Error> {
        self.removing(|store| store.clear_function(function))
    }

    /// Removes the temporary files and lock files that processes which died left behind, when
    /// they are older than `older_than` (younger ones may belong to work in progress). memo does
    /// this by itself, with an hour's margin, the first time a process stores a result of each
    /// function version.
    pub fn clean(&self, older_than: Duration) -> Result<Cleanup, Error> {
        let mut total = Cleanup::default();
        let Some(store) = &self.store else {
            return Ok(total);
        };
        for (function, version) in store.versions() {
            let cleanup = store.clean_version(&function, &version, older_than)?;
            total.temporary_files += cleanup.temporary_files;
            total.lock_files += cleanup.lock_files;
        }
        Ok(total)
    }

    /// Runs [`Store::clean_version`] for one function version on a thread of its own, so that no
    /// call waits for the walk through its folders.
    pub(crate) fn clean_in_background(&self, function: &str, version: &str) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let (function, version) = (function.to_owned(), version.to_owned());
        let spawned = std::thread::Builder::new()
            .name("memo-clean".into())
            .spawn(move || store.clean_version(&function, &version, STALE_AFTER));
        // Without a thread the leftovers simply stay until the next process cleans them.
        drop(spawned);
    }

    /// Empties the in-process memory tier ([`Memory::memory_tier`]), freeing its memory; the
    /// entries on disk stay. For a long program whose next phase does not need the values it
    /// used so far.
    pub fn clear_memory_tier(&self) {
        self.forget_in_memory();
    }

    /// Empties the memory tier (after this process removed entries on purpose: after the disk,
    /// so that a value read from it meanwhile is not kept in memory).
    pub(crate) fn forget_in_memory(&self) {
        if let Some(tier) = &self.tier {
            tier.clear();
        }
    }

    /// [`Memory::store`], shared, for work on other threads.
    pub(crate) fn store_arc(&self) -> Option<Arc<dyn Store>> {
        if disabled_by_env() {
            return None;
        }
        self.store.clone()
    }

    pub(crate) fn store(&self) -> Option<&dyn Store> {
        if disabled_by_env() {
            return None;
        }
        self.store.as_deref()
    }

    /// The store, also when [`MEMO_DISABLE`] turns caching off: for clearing, which must not be
    /// a silent no-op then (as [`Memory::clear`] is not).
    pub(crate) fn store_to_clear(&self) -> Option<&dyn Store> {
        self.store.as_deref()
    }

    /// Whether the source of the function version whose static lives at `id` still has to be
    /// recorded; marks it as recorded.
    pub(crate) fn first_store_of(&self, id: usize) -> bool {
        self.sources_saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id)
    }

    /// Forgets that the source of the function version at `id` was recorded (its folder was
    /// cleared, or the store that recorded it failed): the next store records it again.
    pub(crate) fn forget_saved_source(&self, id: usize) {
        self.sources_saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// [`Memory::forget_saved_source`] for every function (after a clear of many).
    fn forget_saved_sources(&self) {
        self.sources_saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// `path` made absolute against the current folder (as it is, when that cannot be done).
fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// Whether [`MEMO_DISABLE`] turns caching off, read once per process.
fn disabled_by_env() -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    *DISABLED.get_or_init(|| match env::var(MEMO_DISABLE) {
        Ok(value) => !matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no" | "off"
        ),
        Err(env::VarError::NotPresent) => false,
        Err(env::VarError::NotUnicode(_)) => true,
    })
}

/// Anything a `#[cached(memory = EXPR)]` expression may evaluate to.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a `memo::Memory`",
    label = "`memory = ...` takes a `Memory`",
    note = "give a `Memory`, a reference to one, or a `LazyLock`, `Arc` or `Box` of one, e.g. a `static MEMORY: LazyLock<Memory>`"
)]
pub trait AsMemory {
    /// The memory itself.
    fn as_memory(&self) -> &Memory;
}

impl AsMemory for Memory {
    fn as_memory(&self) -> &Memory {
        self
    }
}

impl<T: AsMemory + ?Sized> AsMemory for &T {
    fn as_memory(&self) -> &Memory {
        (**self).as_memory()
    }
}

impl<T: AsMemory + ?Sized> AsMemory for std::sync::Arc<T> {
    fn as_memory(&self) -> &Memory {
        (**self).as_memory()
    }
}

impl<T: AsMemory + ?Sized> AsMemory for Box<T> {
    fn as_memory(&self) -> &Memory {
        (**self).as_memory()
    }
}

impl<T: AsMemory, F: FnOnce() -> T> AsMemory for std::sync::LazyLock<T, F> {
    fn as_memory(&self) -> &Memory {
        std::sync::LazyLock::force(self).as_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counters_lose_no_bump_with_more_threads_than_stripes() {
        // Three waves of threads, more at once than there are owned stripes (each has its
        // stripe after its first bump), all bumping at the same moment: owned stripes pass from
        // ended threads to new ones, the rest share one.
        let counter = Striped::default();
        let threads = 3 * OWNED;
        for wave in 1..=3u64 {
            let claimed = std::sync::Barrier::new(threads);
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|| {
                        counter.bump();
                        claimed.wait();
                        for _ in 1..20_000 {
                            counter.bump();
                        }
                    });
                }
            });
            assert_eq!(counter.get(), wave * threads as u64 * 20_000);
        }
        let per: Vec<u64> = counter
            .0
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .collect();
        assert!(per[OWNED] > 0, "the shared stripe was used: {per:?}");
    }

    #[test]
    fn urls_are_told_from_folders() {
        assert!(is_url("s3://bucket/prefix"));
        assert!(is_url("gs://bucket"));
        assert!(!is_url("/tmp/cache"));
        assert!(!is_url("relative/dir"));
        assert!(!is_url("://nothing"));
        assert!(!is_url("C:\\Users\\me\\cache"));
        assert!(!is_url("odd dir/x://y"));
    }

    #[cfg(not(feature = "remote"))]
    #[test]
    fn a_url_without_the_remote_feature_is_a_clear_error() {
        let error = Memory::at("s3://bucket/prefix").unwrap_err().to_string();
        assert!(error.contains("`remote` feature"), "{error}");
    }
}
