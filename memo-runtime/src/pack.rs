//! Packs: small entries appended to files shared by a function version, instead of one file each.
//!
//! A new file and its name cost tens of microseconds; an append to an open file costs one. So
//! entries up to the pack limit (see [`Memory::pack_limit`](crate::Memory::pack_limit)) are
//! records in a version folder's packs, and larger ones keep a file of their own (read mapped).
//!
//! ```text
//! <version>/
//!   .generation           16 bytes shared by every process through a memory map: a counter
//!                         bumped after each write to a pack (u64), and a "removed" flag (u64)
//!   packs/<pid>-<n>.pack  records, appended by one process each (it holds the file's flock)
//! ```
//!
//! Each process keeps an index of the version's records in memory, built on its first look-up
//! by reading the packs, and brought up to date only when the shared counter moved: a look-up
//! whose key is not in an up-to-date index is a miss without a system call. A record is
//! complete and checksummed before the counter moves, and a reader stops at the first record
//! that is incomplete (a write in progress, or a writer killed in the middle: the next look-up
//! reads on from there) or damaged (the rest of that pack is then ignored, and its entries are
//! misses). Later records of a key win over earlier ones (by the time they were written):
//! a "removed" record hides an entry, a "file" record says the entry has a file of its own, a
//! "used" record only says when the entry was last read (for least-recently-used eviction).
//! Records of quick computations may wait in the writer's memory for a moment and are written
//! together (within [`FLUSH_AFTER`]); compaction merges the packs of writers that ended.
//!
//! Record layout (little-endian; [`RECORD_HEADER`] bytes, then the body, then the preview):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MPK1` |
//! | 4 | 1 | kind: 1 entry (the body is the entry: header and payload), 2 file, 3 removed, 4 used |
//! | 5 | 3 | zero |
//! | 8 | 4 | body length |
//! | 12 | 4 | preview length (the arguments' `Debug` form, UTF-8) |
//! | 16 | 8 | written, nanoseconds since the Unix epoch |
//! | 24 | 32 | the entry's key |
//! | 56 | 8 | XXH3-64 of bytes 0..56, the body and the preview |

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::Xxh3Default;

use crate::key::CacheKey;

/// The folder of a version's packs.
pub const PACK_DIR: &str = "packs";
/// The file of a version's shared change counter.
pub const GENERATION_FILE: &str = ".generation";
/// The name every pack file ends with.
pub const PACK_SUFFIX: &str = ".pack";
/// The four bytes every record starts with.
pub const RECORD_MAGIC: [u8; 4] = *b"MPK1";
/// Length of a record's fixed header.
pub const RECORD_HEADER: usize = 64;
/// A process starts a new pack when its current one has grown past this size, so that packs of
/// a long-running process can be compacted too.
const ROLL_AT: u64 = 256 << 20;
/// Deferred records wait in memory at most about this long.
pub const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(2);
/// Deferred records are written as soon as this many bytes gathered (by the flushing thread;
/// by the calling thread from four times as many).
pub const FLUSH_AT: usize = 64 * 1024;
/// A record longer than this is damage, not a record (entries this large have their own file).
const LONGEST: u32 = 1 << 30;

/// What a record says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The body is the entry.
    Entry = 1,
    /// The entry is a file of its own.
    File = 2,
    /// The entry was removed.
    Removed = 3,
    /// The entry was read (its time is a last use, for least-recently-used eviction).
    Used = 4,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Entry),
            2 => Some(Kind::File),
            3 => Some(Kind::Removed),
            4 => Some(Kind::Used),
            _ => None,
        }
    }
}

/// One record, as read from a pack.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// What it says.
    pub kind: Kind,
    /// When it was written, in nanoseconds since the Unix epoch.
    pub written: u64,
    /// The entry's key.
    pub key: CacheKey,
    /// The entry (for [`Kind::Entry`]), else empty.
    pub body: &'a [u8],
    /// The arguments' preview, when one was recorded.
    pub preview: &'a [u8],
    /// Where the record starts in its pack.
    pub offset: u64,
}

/// Nanoseconds of [`crate::uptime`], plus one (never 0).
fn monotonic_nanos() -> u64 {
    u64::try_from(crate::uptime().as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Nanoseconds since the Unix epoch, now.
pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// [`now_nanos`] to within a few milliseconds, for checks that need no more (whether a use was
/// recorded within the last hour): the coarse clock where the system has one, several times
/// cheaper than the precise one in virtual machines.
pub(crate) fn now_nanos_coarse() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid `timespec` for the call to fill.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) } == 0 {
            if let (Ok(secs), Ok(nanos)) = (u64::try_from(now.tv_sec), u64::try_from(now.tv_nsec)) {
                return secs.saturating_mul(1_000_000_000).saturating_add(nanos);
            }
        }
    }
    now_nanos()
}

/// Encodes one record. `body` is given in parts (an entry's header and payload).
pub fn encode(kind: Kind, written: u64, key: &CacheKey, body: &[&[u8]], preview: &[u8]) -> Vec<u8> {
    let mut record = Vec::new();
    encode_into(&mut record, kind, written, key, body, preview);
    record
}

/// [`encode`], appending to `out`.
fn encode_into(
    out: &mut Vec<u8>,
    kind: Kind,
    written: u64,
    key: &CacheKey,
    body: &[&[u8]],
    preview: &[u8],
) {
    let body_len: usize = body.iter().map(|part| part.len()).sum();
    // Lengths past `LONGEST` never reach here (the pack limit is below it); a preview that long
    // is left out.
    let preview = if preview.len() <= LONGEST as usize {
        preview
    } else {
        &[]
    };
    let start = out.len();
    out.reserve(RECORD_HEADER + body_len + preview.len());
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[kind as u8, 0, 0, 0]);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&(preview.len() as u32).to_le_bytes());
    out.extend_from_slice(&written.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&[0; 8]);
    for part in body {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(preview);
    let mut hasher = Xxh3Default::new();
    hasher.update(&out[start..start + 56]);
    hasher.update(&out[start + RECORD_HEADER..]);
    out[start + 56..start + RECORD_HEADER].copy_from_slice(&hasher.digest().to_le_bytes());
}

/// How far [`parse`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes of complete, valid records from the start.
    pub consumed: usize,
    /// Why the record at `consumed` is not valid, when it is complete but damaged; `None` when
    /// the bytes simply end there (possibly inside a record still being written).
    pub damage: Option<String>,
}

/// Reads the records in `bytes`, which start at offset `base` of their pack, calling `each`
/// for every valid one, up to the first that is incomplete or damaged.
pub fn parse(bytes: &[u8], base: u64, mut each: impl FnMut(Record<'_>)) -> Parsed {
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        if rest.len() < RECORD_HEADER {
            return Parsed {
                consumed: at,
                damage: None,
            };
        }
        let damaged = |why: &str| Parsed {
            consumed: at,
            damage: Some(format!("record at byte {}: {why}", base + at as u64)),
        };
        let word =
            |from: usize| u32::from_le_bytes(rest[from..from + 4].try_into().unwrap_or([0; 4]));
        let long =
            |from: usize| u64::from_le_bytes(rest[from..from + 8].try_into().unwrap_or([0; 8]));
        if rest[..4] != RECORD_MAGIC {
            if rest.iter().all(|&b| b == 0) {
                // Zeros to the end: space the file system gave a write a crash cut short.
                return Parsed {
                    consumed: at,
                    damage: None,
                };
            }
            return damaged("not a record (bad magic bytes)");
        }
        let Some(kind) = Kind::from_byte(rest[4]) else {
            return damaged("unknown record kind");
        };
        let (body_len, preview_len) = (word(8), word(12));
        if body_len > LONGEST || preview_len > LONGEST {
            return damaged("impossible length");
        }
        let end = RECORD_HEADER + body_len as usize + preview_len as usize;
        if rest.len() < end {
            return Parsed {
                consumed: at,
                damage: None,
            };
        }
        let mut hasher = Xxh3Default::new();
        hasher.update(&rest[..56]);
        hasher.update(&rest[RECORD_HEADER..end]);
        if hasher.digest() != long(56) {
            return damaged("checksum mismatch (damaged record)");
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&rest[24..56]);
        let body_end = RECORD_HEADER + body_len as usize;
        each(Record {
            kind,
            written: long(16),
            key: CacheKey::from_bytes(key),
            body: &rest[RECORD_HEADER..body_end],
            preview: &rest[body_end..end],
            offset: base + at as u64,
        });
        at += end;
    }
}

/// Reads a whole pack and parses it; `each` sees every valid record. The pack is mapped, not
/// copied: a damaged (or sparse, or foreign) file is read only as far as it parses. (On a
/// network or FUSE file system it is read instead: a file another machine removes would make a
/// mapping's next page fault end the process.)
pub fn read_pack(path: &Path, each: impl FnMut(Record<'_>)) -> io::Result<Parsed> {
    let file = open_read(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(parse(&[], 0, each));
    }
    if !crate::store::may_map(&file) {
        return Ok(parse(&read_at(&file, 0, len)?, 0, each));
    }
    // SAFETY: a read-only mapping of a pack, which memo never changes in place (see `scan`);
    // it lives as long as the bytes parsed from it.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    Ok(parse(&map, 0, each))
}

/// `len` bytes of `file` from `at`, in memory (refused, rather than aborting the process, when
/// there is no room for them).
fn read_at(file: &File, at: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|len| bytes.try_reserve_exact(len).ok().map(|()| len))
        .map(|len| bytes.resize(len, 0))
        .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "a pack too large to read"))?;
    file.read_exact_at(&mut bytes, at)?;
    Ok(bytes)
}

/// The shared change counter of a version folder, mapped into every process that uses it.
struct Generation {
    map: memmap2::MmapMut,
    /// The counter's file, for [`unlinked`].
    file: File,
}

impl Generation {
    const LEN: u64 = 16;

    /// Opens (with `create`, creates) the counter file in `dir`.
    fn open(dir: &Path, create: bool) -> io::Result<Generation> {
        let path = dir.join(GENERATION_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        // Two processes may do this at once: extending to the same length changes nothing.
        if file.metadata()?.len() < Self::LEN {
            file.set_len(Self::LEN)?;
        }
        // SAFETY: a shared mapping of a file memo only ever extends to 16 bytes and changes
        // through these atomics (the file is never truncated); page-aligned, so the atomics are
        // aligned.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(Self::LEN as usize)
                .map_mut(&file)?
        };
        Ok(Generation { map, file })
    }

    /// A new counter file in `dir`, put in place of one marked removed whose folder was not
    /// removed after all (a removal interrupted or failed): processes holding the old one see
    /// it marked and open this one.
    fn replace(dir: &Path) -> io::Result<Generation> {
        let temporary = dir.join(format!(
            "{GENERATION_FILE}.{}-{:x}",
            std::process::id(),
            now_nanos()
        ));
        let file = create_new(&temporary)?;
        file.set_len(Self::LEN)?;
        drop(file);
        if let Err(error) = fs::rename(&temporary, dir.join(GENERATION_FILE)) {
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
        Generation::open(dir, false)
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        // SAFETY: the mapping is 16 bytes, page-aligned and lives as long as `self`; other
        // processes change it only through atomic operations too.
        unsafe { &*self.map.as_ptr().cast::<AtomicU64>().add(index) }
    }

    fn load(&self) -> u64 {
        self.word(0).load(Ordering::Acquire)
    }

    /// Bumps the counter; returns its value before.
    fn bump(&self) -> u64 {
        self.word(0).fetch_add(1, Ordering::AcqRel)
    }

    fn removed(&self) -> bool {
        self.word(1).load(Ordering::Acquire) != 0
    }

    fn mark_removed(&self) {
        self.word(1).store(1, Ordering::Release);
        self.bump();
    }
}

/// Tells every process using the version folder `dir` that it is about to be removed, so that
/// none keeps serving or appending to its packs.
pub(crate) fn mark_removed(dir: &Path) {
    if let Ok(generation) = Generation::open(dir, false) {
        generation.mark_removed();
    }
}

/// Undoes [`mark_removed`] when the folder could not be removed after all.
pub(crate) fn unmark_removed(dir: &Path) {
    if let Ok(generation) = Generation::open(dir, false) {
        generation.word(1).store(0, Ordering::Release);
        generation.bump();
    }
}

/// Where an index entry's record is.
#[derive(Debug, Clone)]
struct Slot {
    kind: Kind,
    written: u64,
    /// The latest use recorded for it (its `written`, or a later "used" record's).
    used: u64,
    pack: u32,
    /// Where the body starts in the pack.
    body_at: u64,
    body_len: u32,
    /// Set when this process reads the entry's bytes.
    read: ReadBefore,
}

/// Whether this process has read an entry's bytes: set by readers under the shared lock.
#[derive(Debug, Default)]
struct ReadBefore(AtomicBool);

impl Clone for ReadBefore {
    fn clone(&self) -> Self {
        ReadBefore(AtomicBool::new(self.0.load(Ordering::Relaxed)))
    }
}

/// What a look-up learned of an entry besides its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Seen {
    /// The latest recorded use of the entry (nanoseconds since the Unix epoch; 0 when none).
    pub(crate) used: u64,
    /// Whether this process had read the entry's bytes before (since they were last written).
    pub(crate) again: bool,
}

/// A pack this process knows.
#[derive(Debug)]
struct Pack {
    name: OsString,
    file: File,
    /// The pack as far as it was read, mapped: hits copy from it without a system call.
    map: Option<memmap2::Mmap>,
    /// How far its records have been read into the index.
    scanned: u64,
    /// Set when a damaged record stopped the reading for good.
    damaged: bool,
}

/// The packs this process writes to (compaction leaves them alone).
mod own {
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};

    static PACKS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(super) fn add(path: &Path) {
        PACKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(path.to_path_buf());
    }

    pub(super) fn remove(path: &Path) {
        PACKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|own| own != path);
    }

    pub(super) fn writes(path: &Path) -> bool {
        PACKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|own| own == path)
    }
}

/// This process's own pack of a version.
#[derive(Debug)]
struct Writer {
    pack: u32,
    /// Where it is (listed in [`own`] while this is alive).
    path: PathBuf,
    /// Shared with a flush writing without the state's lock.
    file: Arc<File>,
    /// Bytes written to the file.
    end: u64,
    /// Records being written at `end` by a flush that does not hold the state's lock.
    inflight: Option<Arc<Vec<u8>>>,
    /// Records not written yet, which go after `inflight`.
    pending: Vec<u8>,
    /// The process that started it: a child of `fork` inherits it, but must not write to it.
    process: u32,
}

impl Writer {
    /// Where the records waiting in `pending` go in the file.
    fn pending_at(&self) -> u64 {
        self.end + self.inflight.as_ref().map_or(0, |batch| batch.len() as u64)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        own::remove(&self.path);
    }
}

/// In a child of `fork`: lets go of the parent's pack (without unlocking it: the lock is the
/// parent's too) and of the records waiting in the parent's memory, which the parent writes.
fn forget_inherited(state: &mut State) {
    let Some(writer) = state.writer.take_if(|w| w.process != process::id()) else {
        return;
    };
    let (pack, end) = (writer.pack, writer.end);
    state
        .index
        .retain(|(_, slot)| slot.pack != pack || slot.body_at < end);
    // Read like any other pack from now on, from its start.
    if let Some(Some(inherited)) = state.packs.get_mut(pack as usize) {
        inherited.scanned = 0;
        inherited.map = None;
    }
}

/// This process's id, kept current across `fork`.
mod process {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Once;

    static ID: AtomicU32 = AtomicU32::new(0);
    static WATCH: Once = Once::new();

    /// Held by the flushing thread for each pass, by the exit handler, and across `fork`: a
    /// child never starts with a pass half done (the locks it takes held by a thread the child
    /// does not have). A plain `pthread` mutex, because `fork`'s handlers lock and unlock it
    /// without a guard.
    pub(super) struct Gate(std::cell::UnsafeCell<libc::pthread_mutex_t>);

    // SAFETY: the mutex is only used through `pthread_mutex_lock`/`unlock`, which synchronise.
    unsafe impl Sync for Gate {}

    pub(super) static PASS: Gate =
        Gate(std::cell::UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

    /// Holds [`PASS`] until dropped.
    pub(super) struct Held;

    impl Gate {
        pub(super) fn hold(&self) -> Held {
            // SAFETY: a statically initialised mutex, never moved.
            unsafe { libc::pthread_mutex_lock(self.0.get()) };
            Held
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            // SAFETY: locked by this thread in `hold`.
            unsafe { libc::pthread_mutex_unlock(PASS.0.get()) };
        }
    }

    /// Starts following `fork`s.
    pub(super) fn watch() {
        WATCH.call_once(|| {
            ID.store(std::process::id(), Ordering::Release);
            // SAFETY: registers handlers that lock or unlock a static mutex, and (in the child)
            // call `getpid` (async-signal-safe) and store an atomic.
            unsafe {
                libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
            }
        });
    }

    extern "C" fn prepare() {
        // SAFETY: a statically initialised mutex; unlocked by `parent` or `child` after the fork.
        unsafe { libc::pthread_mutex_lock(PASS.0.get()) };
    }

    extern "C" fn parent() {
        // SAFETY: locked by this thread in `prepare`.
        unsafe { libc::pthread_mutex_unlock(PASS.0.get()) };
    }

    extern "C" fn child() {
        ID.store(std::process::id(), Ordering::Release);
        // SAFETY: locked by the forking thread in `prepare`, which is this thread in the child.
        unsafe { libc::pthread_mutex_unlock(PASS.0.get()) };
    }

    pub(super) fn id() -> u32 {
        ID.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct State {
    generation: Option<Generation>,
    /// The counter's value when the index was last brought up to date.
    seen: u64,
    index: Index,
    packs: Vec<Option<Pack>>,
    writer: Option<Writer>,
    /// Whether the folder was looked at once for entry files written without a record.
    files_listed: bool,
    /// When an append last checked that the counter and the pack are still in the folder
    /// ([`now_nanos`], which appends read anyway).
    checked_at: u64,
}

/// How often appends check that this process's counter and pack are still in the folder.
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether `file` was removed from its folder (it has no name left).
fn unlinked(file: &File) -> bool {
    file.metadata().is_ok_and(|meta| meta.nlink() == 0)
}

/// Lets go of a counter or a pack that is no longer in the folder (deleted by hand with the
/// folder, or a counter another process replaced at the same moment as this one): appends would
/// go to a file nobody sees, and the counter would never move again. Checked at most every
/// [`CHECK_EVERY`] (`now`: the wall clock; one set back checks at once); what went to such a
/// pack meanwhile is lost (computed again when asked for).
fn let_go_of_unlinked(state: &mut State, now: u64) {
    if now >= state.checked_at && now - state.checked_at < CHECK_EVERY.as_nanos() as u64 {
        return;
    }
    state.checked_at = now;
    if state.writer.as_ref().is_some_and(|w| unlinked(&w.file)) {
        *state = State::default();
    } else if state.generation.as_ref().is_some_and(|g| unlinked(&g.file)) {
        // The pack is still there: only the counter is opened again, and everything read anew.
        state.generation = None;
        state.seen = 0;
    }
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({})", self.load())
    }
}

/// A record to append ([`Packs::append`]).
pub(crate) struct NewRecord<'a> {
    pub(crate) kind: Kind,
    pub(crate) key: &'a CacheKey,
    /// The entry, in parts (for [`Kind::Entry`]).
    pub(crate) body: &'a [&'a [u8]],
    pub(crate) preview: &'a [u8],
    /// Whether it may wait in memory for a moment.
    pub(crate) defer: bool,
}

/// What the packs know of a key.
#[derive(Debug)]
pub(crate) enum Found {
    /// No record and no entry file: the entry is absent.
    Absent,
    /// The entry's bytes.
    Entry(Vec<u8>),
    /// The entry is a file of its own (or may be: a file older than packs).
    File,
}

/// The packs of one version folder, as this process sees them.
#[derive(Debug)]
pub(crate) struct Packs {
    dir: PathBuf,
    durable: bool,
    state: RwLock<State>,
    /// Held by a flush from taking the waiting records to recording them written: one at a
    /// time, and records reach the file in order.
    writing: Mutex<()>,
    /// When a look-up last found the folder without packs ([`monotonic_nanos`]; 0: not known).
    /// Look-ups within [`ABSENT_FOR`] of it answer from the index without looking again, so a
    /// map's look-up pass over a new function does not open a missing file per item.
    absent_at: AtomicU64,
}

/// How long a folder found without packs is taken to still have none (by look-ups that are not
/// made under the key's lock, which forgets it): another process's first values in the meantime
/// are found that much later, and a quick function may compute one of them again.
pub(crate) const ABSENT_FOR: std::time::Duration = std::time::Duration::from_millis(10);

impl Packs {
    pub(crate) fn new(dir: PathBuf, durable: bool) -> Packs {
        process::watch();
        Packs {
            dir,
            durable,
            state: RwLock::default(),
            writing: Mutex::new(()),
            absent_at: AtomicU64::new(0),
        }
    }

    /// Forgets that the folder had no packs: the next look-up looks again.
    pub(crate) fn forget_absence(&self) {
        self.absent_at.store(0, Ordering::Relaxed);
    }

    /// Whether a look-up found the folder without packs less than [`ABSENT_FOR`] ago.
    fn recently_absent(&self) -> bool {
        let at = self.absent_at.load(Ordering::Relaxed);
        at != 0 && monotonic_nanos().saturating_sub(at) < ABSENT_FOR.as_nanos() as u64
    }

    /// The version folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `key` up; reads the packs' new records first when another process added some.
    pub(crate) fn get(&self, key: &CacheKey) -> io::Result<Found> {
        self.get_used(key).map(|(found, _)| found)
    }

    /// [`Packs::get`], with what the same look-up learned of the entry: its latest recorded use,
    /// and whether this process read it before.
    pub(crate) fn get_used(&self, key: &CacheKey) -> io::Result<(Found, Seen)> {
        self.with_current(|state| self.found(state, key))
    }

    /// Whether the packs hold an entry for `key` (`Some`), without reading it; `None` when the
    /// entry is a file of its own (or may be).
    pub(crate) fn contains(&self, key: &CacheKey) -> Option<bool> {
        self.with_current(|state| match index_get(&state.index, key) {
            Some(slot) => match slot.kind {
                Kind::Entry => Some(true),
                Kind::Removed | Kind::Used => Some(false),
                Kind::File => None,
            },
            None if state.files_listed || state.generation.is_some() => Some(false),
            None => None,
        })
    }

    /// Runs `f` on the index, brought up to date first when another process added records.
    fn with_current<R>(&self, f: impl Fn(&State) -> R) -> R {
        {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            let current = match &state.generation {
                Some(generation) => generation.load() == state.seen && !generation.removed(),
                None => state.files_listed && self.recently_absent(),
            };
            if current {
                return f(&state);
            }
        }
        let mut state = self.write_state();
        self.refresh(&mut state);
        f(&state)
    }

    fn found(&self, state: &State, key: &CacheKey) -> io::Result<(Found, Seen)> {
        let Some(slot) = index_get(&state.index, key) else {
            let found = if state.files_listed || state.generation.is_some() {
                Found::Absent
            } else {
                Found::File
            };
            return Ok((found, Seen::default()));
        };
        let seen = Seen {
            used: slot.used,
            // Written only the first time: readers of a hot entry do not pass its line around.
            again: slot.read.0.load(Ordering::Relaxed) || slot.read.0.swap(true, Ordering::Relaxed),
        };
        self.found_entry(state, slot).map(|found| (found, seen))
    }

    fn found_entry(&self, state: &State, slot: &Slot) -> io::Result<Found> {
        match slot.kind {
            Kind::Removed | Kind::Used => Ok(Found::Absent),
            Kind::File => Ok(Found::File),
            Kind::Entry => {
                if let Some(writer) = state.writer.as_ref().filter(|w| w.pack == slot.pack) {
                    let len = slot.body_len as usize;
                    let copy = |bytes: &[u8], from: u64| {
                        let from = from as usize;
                        bytes
                            .get(from..from + len)
                            .map_or(Found::Absent, |body| Found::Entry(body.to_vec()))
                    };
                    if slot.body_at >= writer.pending_at() {
                        // Waiting in memory.
                        return Ok(copy(&writer.pending, slot.body_at - writer.pending_at()));
                    }
                    if let Some(batch) = writer
                        .inflight
                        .as_ref()
                        .filter(|_| slot.body_at >= writer.end)
                    {
                        // Being written.
                        return Ok(copy(batch, slot.body_at - writer.end));
                    }
                }
                let Some(Some(pack)) = state.packs.get(slot.pack as usize) else {
                    return Ok(Found::Absent);
                };
                let (from, len) = (slot.body_at as usize, slot.body_len as usize);
                if let Some(mapped) = pack.map.as_ref().and_then(|map| map.get(from..from + len)) {
                    return Ok(Found::Entry(mapped.to_vec()));
                }
                // A record this process appended itself (or a pack on a network file system):
                // not mapped.
                read_at(&pack.file, slot.body_at, u64::from(slot.body_len)).map(Found::Entry)
            }
        }
    }

    /// Brings the index up to date with the folder: new packs, new records, packs removed.
    fn refresh(&self, state: &mut State) {
        if state.generation.as_ref().is_some_and(Generation::removed) {
            *state = State::default();
        }
        // In a child of `fork` that only reads, the parent's pack is read like the others.
        forget_inherited(state);
        if state.generation.is_none() {
            match Generation::open(&self.dir, false) {
                Ok(generation) if !generation.removed() => state.generation = Some(generation),
                // Nothing was packed in this folder yet; or its removal is under way (or was
                // interrupted: then the next write puts a new counter in place).
                _ => {
                    self.list_files(state);
                    self.absent_at.store(monotonic_nanos(), Ordering::Relaxed);
                    return;
                }
            }
        }
        let Some(seen) = state.generation.as_ref().map(Generation::load) else {
            return;
        };
        self.list_files(state);
        let own = state.writer.as_ref().map(|w| w.pack);
        let mut names: Vec<OsString> = match fs::read_dir(self.dir.join(PACK_DIR)) {
            Ok(read) => read
                .flatten()
                .map(|item| item.file_name())
                .filter(|name| name.to_string_lossy().ends_with(PACK_SUFFIX))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            // (Out of file descriptors, say: the packs are not gone; the next look-up looks
            // again, the index left as it was.)
            Err(_) => return,
        };
        // Packs removed meanwhile (compacted into another): forget their records (in one pass
        // over the index, however many went).
        let mut gone = Vec::new();
        for id in 0..state.packs.len() {
            let removed = match &state.packs[id] {
                Some(pack) => Some(id as u32) != own && !names.contains(&pack.name),
                None => false,
            };
            if removed {
                state.packs[id] = None;
                gone.push(id as u32);
            }
        }
        if !gone.is_empty() {
            state.index.retain(|(_, slot)| !gone.contains(&slot.pack));
        }
        names.retain(|name| !state.packs.iter().flatten().any(|pack| pack.name == *name));
        names.sort();
        for name in names {
            let path = self.dir.join(PACK_DIR).join(&name);
            let Ok(file) = open_read(&path) else {
                continue;
            };
            place(
                &mut state.packs,
                Pack {
                    name,
                    file,
                    map: None,
                    scanned: 0,
                    damaged: false,
                },
            );
        }
        for id in 0..state.packs.len() {
            if Some(id as u32) != own {
                scan(state, id as u32);
            }
        }
        state.seen = seen;
    }

    /// Once per process: entry files that have no record (written before packs, or by hand)
    /// enter the index, so that the index alone answers every look-up.
    fn list_files(&self, state: &mut State) {
        if state.files_listed {
            return;
        }
        state.files_listed = true;
        let Ok(read) = fs::read_dir(&self.dir) else {
            return;
        };
        for shard in read.flatten() {
            let name = shard.file_name();
            let name = name.to_string_lossy();
            let is_shard = name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if !is_shard {
                continue;
            }
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for file in files.flatten() {
                if let Some(key) = crate::store::decode_hex_key(&file.file_name().to_string_lossy())
                {
                    // Written at time 0: any record of the key is newer.
                    let slot = Slot {
                        kind: Kind::File,
                        written: 0,
                        used: 0,
                        pack: u32::MAX,
                        body_at: 0,
                        body_len: 0,
                        read: ReadBefore::default(),
                    };
                    state
                        .index
                        .upsert(|(k, _)| *k == key, (key, slot), |_, _| {});
                }
            }
        }
    }

    /// Appends a record for `key` to this process's pack (creating the folders, the counter and
    /// the pack as needed), then bumps the counter. With `defer`, the record may wait in memory
    /// (this process sees it at once) and go to the disk with others: within [`FLUSH_AFTER`],
    /// when [`FLUSH_AT`] bytes gathered, at the next record not deferred, or when the process
    /// exits normally.
    pub(crate) fn append(
        self: &Arc<Self>,
        record: NewRecord<'_>,
        create_dir: &dyn Fn(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        let NewRecord {
            kind,
            key,
            body,
            preview,
            defer,
        } = record;
        let now = now_nanos();
        let mut state = self.write_state();
        if state.generation.as_ref().is_some_and(Generation::removed) {
            *state = State::default();
        }
        let_go_of_unlinked(&mut state, now);
        if state.generation.is_none() {
            self.refresh(&mut state);
        }
        if state.generation.is_none() {
            create_dir(&self.dir)?;
            let mut generation = Generation::open(&self.dir, true)?;
            if generation.removed() {
                generation = Generation::replace(&self.dir)?;
            }
            state.generation = Some(generation);
            self.refresh(&mut state);
        }
        forget_inherited(&mut state);
        let full = |w: &Writer| w.end >= ROLL_AT;
        if state
            .writer
            .as_ref()
            .is_some_and(|w| full(w) && (!w.pending.is_empty() || w.inflight.is_some()))
        {
            // A full pack: what waits for it is written before the next pack starts.
            drop(state);
            self.flush()?;
            state = self.write_state();
            forget_inherited(&mut state);
        }
        // (A pack that others filled again meanwhile goes on a little longer.)
        let needs_pack = state
            .writer
            .as_ref()
            .is_none_or(|w| full(w) && w.pending.is_empty() && w.inflight.is_none());
        if needs_pack {
            self.start_pack(&mut state, create_dir)?;
        }
        let defer = defer && flusher::running();
        // Now, not the entry's creation, and after every record of the key this process knows,
        // even when the clock went back meanwhile: an entry fetched from elsewhere, a value
        // computed again or a removal must be newer than what it replaces.
        let written = index_get(&state.index, key)
            .map_or(0, |slot| slot.written.saturating_add(1))
            .max(now);
        let Some(writer) = state.writer.as_mut() else {
            return Err(io::Error::other("no pack to write to"));
        };
        let first_pending = writer.pending.is_empty();
        let at = writer.pending_at() + writer.pending.len() as u64;
        encode_into(&mut writer.pending, kind, written, key, body, preview);
        let slot = Slot {
            kind,
            written,
            used: written,
            pack: writer.pack,
            body_at: at + RECORD_HEADER as u64,
            body_len: body.iter().map(|part| part.len()).sum::<usize>() as u32,
            read: ReadBefore::default(),
        };
        let gathered = writer.pending.len();
        upsert(&mut state.index, *key, slot);
        if defer && gathered < 4 * FLUSH_AT {
            if first_pending {
                flusher::schedule(Arc::downgrade(self));
            }
            if gathered >= FLUSH_AT {
                // Written now, but by the flushing thread: a write the kernel holds up (while
                // it writes back other dirty pages) does not hold up the calls.
                flusher::hurry();
            }
            return Ok(());
        }
        // Not to wait, or four times that waiting (the disk does not keep up): written now.
        drop(state);
        self.flush()
    }

    /// Writes the records waiting in memory, if any, without holding the state's lock while
    /// writing: look-ups and appends go on meanwhile.
    pub(crate) fn flush(&self) -> io::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let (file, at, batch, pack) = {
            let mut state = self.write_state();
            forget_inherited(&mut state);
            let Some(writer) = state.writer.as_mut() else {
                return Ok(());
            };
            if writer.pending.is_empty() || writer.inflight.is_some() {
                return Ok(());
            }
            let batch = Arc::new(std::mem::take(&mut writer.pending));
            writer.inflight = Some(Arc::clone(&batch));
            (Arc::clone(&writer.file), writer.end, batch, writer.pack)
        };
        let written = file.write_all_at(&batch, at).and_then(|()| {
            if self.durable {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        let mut state = self.write_state();
        let State {
            writer,
            index,
            generation,
            seen,
            ..
        } = &mut *state;
        let Some(active) = writer
            .as_mut()
            .filter(|w| w.pack == pack && Arc::ptr_eq(&w.file, &file))
        else {
            // Let go meanwhile (its folder removed): nothing to record.
            return written;
        };
        if let Err(error) = written {
            // What may have been written of them is an incomplete record: those records, and
            // the ones appended after them, are lost (their values are computed again when
            // asked for), and a new pack starts.
            index.retain(|(_, slot)| slot.pack != pack || slot.body_at < at);
            *writer = None;
            return Err(error);
        }
        active.end += batch.len() as u64;
        active.inflight = None;
        if active.pending.is_empty() {
            // Its allocation again, for the next records.
            if let Ok(mut reused) = Arc::try_unwrap(batch) {
                reused.clear();
                if reused.capacity() <= 4 * FLUSH_AT {
                    active.pending = reused;
                }
            }
        }
        if let Some(generation) = generation.as_ref() {
            if generation.bump() == *seen {
                // Nobody else wrote meanwhile: the index is still up to date.
                *seen += 1;
            }
        }
        Ok(())
    }

    /// Starts a new pack of this process: `packs/<pid>-<time>.pack`, held with a file lock for
    /// as long as it is written to. The current one, if any, has nothing waiting.
    fn start_pack(
        &self,
        state: &mut State,
        create_dir: &dyn Fn(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        if let Some(old) = state.writer.take() {
            // Finished: others may compact it from now on.
            let _ = old.file.unlock();
        }
        let folder = self.dir.join(PACK_DIR);
        let name = format!("{}-{:x}{PACK_SUFFIX}", std::process::id(), now_nanos());
        let path = folder.join(&name);
        let open = || create_new(&path);
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dir(&folder)?;
                open()?
            }
            other => other?,
        };
        file.try_lock()
            .map_err(|_| io::Error::other("cannot lock a new pack"))?;
        if self.durable {
            File::open(&folder)?.sync_all()?;
        }
        let reader = open_read(&path)?;
        let id = place(
            &mut state.packs,
            Pack {
                name: name.into(),
                file: reader,
                map: None,
                scanned: 0,
                damaged: false,
            },
        );
        own::add(&path);
        state.writer = Some(Writer {
            pack: id,
            path: path.clone(),
            file: Arc::new(file),
            end: 0,
            inflight: None,
            pending: Vec::new(),
            process: process::id(),
        });
        Ok(())
    }

    /// Forgets everything this process knows of the folder (before it is removed).
    pub(crate) fn forget(&self) {
        *self.write_state() = State::default();
    }

    /// Whether this process has a pack open for writing in this folder.
    #[cfg(test)]
    fn writing(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .writer
            .is_some()
    }
}

/// Writes deferred records in the background, and at the exit of the process.
mod flusher {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Condvar, Mutex, Once, PoisonError, Weak};

    use super::{Packs, FLUSH_AFTER};

    /// Packs with records waiting, and whether the flushing thread runs.
    static WAITING: Mutex<Vec<Weak<Packs>>> = Mutex::new(Vec::new());
    static WAKE: Condvar = Condvar::new();
    static START: Once = Once::new();
    /// Set when records should be written without waiting for [`FLUSH_AFTER`].
    static HURRY: AtomicBool = AtomicBool::new(false);
    /// The process in which the flushing thread was started (threads do not survive `fork`).
    static STARTED_IN: AtomicU32 = AtomicU32::new(0);
    /// The process in which it could not be started.
    static FAILED_IN: AtomicU32 = AtomicU32::new(0);

    /// Has `packs`'s waiting records written within [`FLUSH_AFTER`].
    pub(super) fn schedule(packs: Weak<Packs>) {
        START.call_once(|| {
            // SAFETY: registers a function without arguments that only takes locks and writes
            // files; it runs at a normal exit.
            unsafe {
                libc::atexit(at_exit);
            }
        });
        let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.push(packs);
        if waiting.len() == 1 {
            // The thread waits for a first one.
            WAKE.notify_one();
        }
    }

    /// Whether this process has its flushing thread (started now if not: once per process, a
    /// child of `fork` included). Without one, nothing waits in memory.
    pub(super) fn running() -> bool {
        let me = super::process::id();
        if FAILED_IN.load(Ordering::Acquire) == me {
            return false;
        }
        let started = STARTED_IN.load(Ordering::Acquire);
        if started == me {
            return true;
        }
        if STARTED_IN
            .compare_exchange(started, me, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another thread of this process is starting it.
            return true;
        }
        let spawned = std::thread::Builder::new()
            .name("memo-flush".into())
            .spawn(run);
        if spawned.is_err() {
            FAILED_IN.store(me, Ordering::Release);
            tracing::warn!(target: "memo", "cannot start the thread that writes quick results; each is written at once");
            return false;
        }
        true
    }

    /// Has the waiting records written at once.
    pub(super) fn hurry() {
        if !HURRY.swap(true, Ordering::AcqRel) {
            let _guard = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
            WAKE.notify_one();
        }
    }

    fn flush_all() {
        let waiting = std::mem::take(&mut *WAITING.lock().unwrap_or_else(PoisonError::into_inner));
        for packs in waiting.iter().filter_map(Weak::upgrade) {
            if let Err(error) = packs.flush() {
                crate::log::warn(&format!(
                    "writing quick results to {}: {error}; they are computed again when asked for",
                    packs.dir.display()
                ));
            }
        }
    }

    fn run() {
        loop {
            {
                let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
                while waiting.is_empty() {
                    waiting = WAKE.wait(waiting).unwrap_or_else(PoisonError::into_inner);
                }
                if !HURRY.load(Ordering::Acquire) {
                    // Gather for a moment (or until hurried).
                    drop(
                        WAKE.wait_timeout(waiting, FLUSH_AFTER)
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                }
            }
            let _pass = super::process::PASS.hold();
            HURRY.store(false, Ordering::Release);
            flush_all();
        }
    }

    extern "C" fn at_exit() {
        // After the flushing thread's pass, if one is under way: it may have taken the list.
        let _pass = super::process::PASS.hold();
        // Never unwinds into C.
        let _ = std::panic::catch_unwind(flush_all);
    }
}

/// Adds a pack, in the place of one gone if there is one (no slot refers to it any more);
/// returns its number.
fn place(packs: &mut Vec<Option<Pack>>, pack: Pack) -> u32 {
    match packs.iter().position(Option::is_none) {
        Some(free) => {
            packs[free] = Some(pack);
            free as u32
        }
        None => {
            packs.push(Some(pack));
            (packs.len() - 1) as u32
        }
    }
}

/// Where each key's newest record is (see [`crate::chunked`] for why not a plain hash map).
type Index = crate::chunked::Table<(CacheKey, Slot)>;

impl crate::chunked::Placed for (CacheKey, Slot) {
    fn place(&self) -> u64 {
        key_hash(&self.0)
    }
}

/// The slot of `key` in `index`.
fn index_get<'a>(index: &'a Index, key: &CacheKey) -> Option<&'a Slot> {
    index
        .find(key_hash(key), |(k, _)| k == key)
        .map(|(_, slot)| slot)
}

/// What the index places `key` by.
fn key_hash(key: &CacheKey) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(key)
}

impl Drop for Packs {
    fn drop(&mut self) {
        // What waits in memory is written before the index is let go.
        let _ = self.flush();
    }
}

/// Records `slot` for `key` unless a newer record is there. A "used" record only moves the
/// latest use of the key's record; read before any other record of its key (which may be in a
/// pack read later), it stands alone for that time, as no entry, until one comes.
fn upsert(index: &mut Index, key: CacheKey, slot: Slot) {
    let new = (key, slot);
    index.upsert(
        |(k, _)| *k == key,
        new,
        |(_, present), (_, slot)| {
            let used = present.used.max(slot.used);
            if slot.kind == Kind::Used {
                present.used = used;
            } else if present.kind == Kind::Used || slot.written >= present.written {
                *present = Slot { used, ..slot };
            }
        },
    );
}

/// Reads pack `id` on from where it was read last, into the index.
fn scan(state: &mut State, id: u32) {
    let State { packs, index, .. } = state;
    let Some(Some(pack)) = packs.get_mut(id as usize) else {
        return;
    };
    if pack.damaged {
        return;
    }
    let Ok(len) = pack.file.metadata().map(|m| m.len()) else {
        return;
    };
    if pack.scanned >= len {
        return;
    }
    let mapped = pack.map.as_ref().map_or(0, |map| map.len() as u64);
    let tail = len - mapped;
    let each = |index: &mut Index, record: Record<'_>| {
        let slot = Slot {
            kind: record.kind,
            written: record.written,
            used: record.written,
            pack: id,
            body_at: record.offset + RECORD_HEADER as u64,
            body_len: record.body.len() as u32,
            read: ReadBefore::default(),
        };
        upsert(index, record.key, slot);
    };
    let parsed = if (pack.map.is_none() || tail > (1 << 20).max(mapped / 4))
        && crate::store::may_map(&pack.file)
    {
        // The first reading, or much was added: (re)mapped whole. Its pages are read in one go
        // the first time, rather than a fault each.
        // SAFETY: memo never changes the bytes of a pack that a reader has read (records are
        // only appended, packs are replaced by new files, and a damaged pack is only cut after
        // its damage, which no reader reads past); only bytes below the length read now are
        // accessed. (A process outside memo truncating a pack while it is mapped would fault
        // the reader, as for a mapped entry file.)
        let map = unsafe {
            let mut options = memmap2::MmapOptions::new();
            options.len(len as usize);
            // (Not a pack larger than packs grow: a sparse or foreign file is not read whole.)
            if pack.map.is_none() && len <= ROLL_AT + (1 << 20) {
                options.populate();
            }
            options.map(&pack.file)
        };
        let Ok(map) = map else {
            return;
        };
        // About 150 bytes per record of a small value: room for them at once.
        // (Bounded: a pack of large records, or a sparse file, must not reserve gigabytes.)
        index.try_reserve((((len - pack.scanned) / 150) as usize).min(1 << 20));
        let parsed = parse(&map[pack.scanned as usize..], pack.scanned, |r| {
            each(index, r)
        });
        pack.map = Some(map);
        parsed
    } else {
        // A little was added (or the pack is on a network file system): read, and served by
        // reads until the next remapping.
        let Ok(bytes) = read_at(&pack.file, pack.scanned, len - pack.scanned) else {
            return;
        };
        parse(&bytes, pack.scanned, |r| each(index, r))
    };
    pack.scanned += parsed.consumed as u64;
    // An incomplete record at the end is read whole by a later refresh.
    pack.damaged = parsed.damage.is_some();
}

/// Creates a file of memo's that must not exist yet (mode 0600, never through a link), open for
/// reading and writing.
fn create_new(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens a pack for reading, without following a symbolic link.
fn open_read(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Every live entry of a version folder's packs, as the index would resolve them: the newest
/// record of each key, removed ones left out; also the damage met, per pack.
#[derive(Debug)]
pub struct Contents {
    /// The live entries, by key.
    pub entries: Vec<PackedEntry>,
    /// Packs whose reading stopped at a damaged record, and why.
    pub damaged: Vec<(PathBuf, String)>,
}

/// One live packed entry.
#[derive(Debug)]
pub struct PackedEntry {
    /// Its key.
    pub key: CacheKey,
    /// The entry: header and payload (only the header unless asked for, see [`contents`]).
    pub body: Vec<u8>,
    /// The arguments' preview, when one was recorded.
    pub preview: Option<String>,
    /// Its record's length in its pack: header, whole body and preview.
    pub size: u64,
    /// When its record was written, in nanoseconds since the Unix epoch.
    pub written: u64,
    /// Its latest recorded use: `written`, or a later "used" record's time.
    pub last_used: u64,
    /// Always [`Kind::Entry`] in [`Contents::entries`].
    pub kind: Kind,
}

/// Reads every pack of the version folder `dir` (for listings, verification and tools); with
/// `bodies`, keeps each live entry whole, else only its header (a listing holds no payloads).
pub fn contents(dir: &Path, bodies: bool) -> Contents {
    let mut newest: HashMap<CacheKey, PackedEntry> = HashMap::new();
    let mut used: HashMap<CacheKey, u64> = HashMap::new();
    let mut damaged = Vec::new();
    for path in pack_paths(dir) {
        let parsed = read_pack(&path, |record| {
            let last = used.entry(record.key).or_insert(0);
            *last = (*last).max(record.written);
            if record.kind == Kind::Used {
                return;
            }
            let newer = newest
                .get(&record.key)
                .is_none_or(|present| record.written >= present.written);
            if newer {
                newest.insert(
                    record.key,
                    PackedEntry {
                        key: record.key,
                        body: if bodies {
                            record.body.to_vec()
                        } else {
                            record.body[..record.body.len().min(crate::entry::HEADER_LEN)].to_vec()
                        },
                        preview: (!record.preview.is_empty())
                            .then(|| String::from_utf8_lossy(record.preview).into_owned()),
                        size: (RECORD_HEADER + record.body.len() + record.preview.len()) as u64,
                        written: record.written,
                        last_used: record.written,
                        kind: record.kind,
                    },
                );
            }
        });
        if let Ok(Parsed {
            damage: Some(why), ..
        }) = parsed
        {
            damaged.push((path, why));
        }
    }
    let mut entries: Vec<PackedEntry> = newest
        .into_values()
        .filter(|entry| entry.kind == Kind::Entry)
        .map(|mut entry| {
            entry.last_used = used.get(&entry.key).copied().unwrap_or(entry.written);
            entry
        })
        .collect();
    entries.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    Contents { entries, damaged }
}

/// The pack files of a version folder, by name.
pub fn pack_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = match fs::read_dir(dir.join(PACK_DIR)) {
        Ok(read) => read
            .flatten()
            .filter(|item| item.file_name().to_string_lossy().ends_with(PACK_SUFFIX))
            .map(|item| item.path())
            .collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths
}

/// Rewrites the packs of `dir` whose writers are gone into one, keeping only the newest record of
/// each key (and a "removed" record only while an older record of the key remains in a pack
/// not rewritten: one still written to, or a damaged one, which is left for `verify`). Done
/// when a quarter of their bytes are dead records, or (leaving out a pack larger than all the
/// others together) when there are at least `min_packs` of them. Returns the bytes freed.
pub(crate) fn compact(dir: &Path, min_packs: usize) -> io::Result<u64> {
    let mut finished = Vec::new();
    let mut live = Vec::new();
    for path in pack_paths(dir) {
        let Ok(file) = open_read(&path) else {
            continue;
        };
        // A pack whose writer is alive is locked by it (and one of this process is known
        // without the lock, which some network file systems share between a process's files);
        // an empty one may be a writer's in the instant before it locks it. A damaged one is
        // left as it is, for `verify` to report (and cut). Their records still count against
        // the others.
        let damaged = || read_pack(&path, |_| {}).map_or(true, |p| p.damage.is_some());
        let empty = file.metadata().map_or(true, |m| m.len() == 0);
        if own::writes(&path) || empty {
            live.push(path);
            continue;
        }
        match file.try_lock() {
            Ok(()) if !damaged() => finished.push((path, file)),
            _ => live.push(path),
        }
    }
    if finished.is_empty() {
        return Ok(0);
    }
    let (kept, total) = plan(&finished, &live)?;
    let kept_bytes: u64 = kept.iter().map(|r| r.len() as u64).sum();
    // Merged whole when a quarter of it is dead (removed or replaced records).
    if total.saturating_sub(kept_bytes) * 4 >= total && kept_bytes < total {
        return write_merged(dir, &finished, kept, total);
    }
    if finished.len() < min_packs {
        return Ok(0);
    }
    // Merged for their number: all but the largest when it outweighs the others together, so
    // that packs added one by one (a job array) do not rewrite the whole cache each time; it
    // joins a merge once the others have grown as large.
    let size = |path: &Path| fs::metadata(path).map_or(0, |m| m.len());
    finished.sort_by_key(|(path, _)| std::cmp::Reverse(size(path)));
    let rest: u64 = finished.iter().skip(1).map(|(path, _)| size(path)).sum();
    if size(&finished[0].0) > rest {
        let (largest, _) = finished.remove(0);
        live.push(largest);
    }
    if finished.len() < 2 {
        return Ok(0);
    }
    let (kept, total) = plan(&finished, &live)?;
    write_merged(dir, &finished, kept, total)
}

/// The records of `merged` worth keeping, oldest first, and the bytes of `merged`: each key's
/// newest record among them, unless a newer one is in `others`; a removal only while an older
/// record of its key remains in `others`. (A "used" record in `others` is no newer version of
/// its key: it only says when the entry was read.)
fn plan(merged: &[(PathBuf, File)], others: &[PathBuf]) -> io::Result<(Vec<Vec<u8>>, u64)> {
    let mut other_newest: HashMap<CacheKey, u64> = HashMap::new();
    for path in others {
        let _ = read_pack(path, |record| {
            if record.kind == Kind::Used {
                return;
            }
            let newest = other_newest.entry(record.key).or_insert(0);
            *newest = (*newest).max(record.written);
        });
    }
    let mut newest: HashMap<CacheKey, (u64, Vec<u8>)> = HashMap::new();
    let mut used: HashMap<CacheKey, u64> = HashMap::new();
    let mut total = 0u64;
    for (path, _) in merged {
        let parsed = read_pack(path, |record| {
            if record.kind == Kind::Used {
                let last = used.entry(record.key).or_insert(0);
                *last = (*last).max(record.written);
                return;
            }
            let newer = newest
                .get(&record.key)
                .is_none_or(|(written, _)| record.written >= *written);
            if newer {
                let bytes = encode(
                    record.kind,
                    record.written,
                    &record.key,
                    &[record.body],
                    record.preview,
                );
                newest.insert(record.key, (record.written, bytes));
            }
        })?;
        if parsed.damage.is_some() {
            return Err(io::Error::other(
                "a pack was damaged meanwhile; left for later",
            ));
        }
        total += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    // The latest use of an entry that lives in another pack goes along too.
    let mut kept: Vec<(u64, Vec<u8>)> = used
        .iter()
        .filter(|(key, last)| {
            !newest.contains_key(key) && other_newest.get(key).is_some_and(|at| at < last)
        })
        .map(|(key, &last)| (last, encode(Kind::Used, last, key, &[], b"")))
        .collect();
    for (key, (written, bytes)) in newest {
        let superseded = other_newest.get(&key).is_some_and(|other| *other > written);
        let kind = Kind::from_byte(bytes[4]);
        if superseded || (kind == Some(Kind::Removed) && !other_newest.contains_key(&key)) {
            continue;
        }
        // The entry's latest use goes along (one record for all those merged).
        if let Some(&last) = used.get(&key).filter(|&&last| last > written) {
            if kind == Some(Kind::Entry) {
                kept.push((last, encode(Kind::Used, last, &key, &[], b"")));
            }
        }
        kept.push((written, bytes));
    }
    kept.sort_by_key(|(written, _)| *written);
    Ok((kept.into_iter().map(|(_, bytes)| bytes).collect(), total))
}

/// Writes `kept` as one new pack, flushed to the disk, then removes `merged`; the bytes freed.
fn write_merged(
    dir: &Path,
    merged: &[(PathBuf, File)],
    kept: Vec<Vec<u8>>,
    total: u64,
) -> io::Result<u64> {
    let kept_bytes: u64 = kept.iter().map(|r| r.len() as u64).sum();
    if !kept.is_empty() {
        let name = format!("{}-{:x}-c{PACK_SUFFIX}", std::process::id(), now_nanos());
        let path = dir.join(PACK_DIR).join(name);
        let file = create_new(&path)?;
        file.try_lock()
            .map_err(|_| io::Error::other("cannot lock a new pack"))?;
        let mut at = 0;
        let written = kept.iter().try_for_each(|record| {
            file.write_all_at(record, at)?;
            at += record.len() as u64;
            Ok::<(), io::Error>(())
        });
        // On the disk, with its name, before the packs it replaces are removed: always, since
        // those may hold results of any age.
        let synced = written
            .and_then(|()| file.sync_all())
            .and_then(|()| File::open(dir.join(PACK_DIR))?.sync_all());
        if let Err(error) = synced {
            let _ = fs::remove_file(&path);
            return Err(error);
        }
    }
    for (path, _) in merged {
        let _ = fs::remove_file(path);
    }
    if let Ok(generation) = Generation::open(dir, false) {
        generation.bump();
    }
    Ok(total.saturating_sub(kept_bytes))
}

/// Replaces a damaged pack by one of its records before the damage, when no process writes to
/// it any more; whether something was cut.
pub(crate) fn repair(path: &Path) -> io::Result<bool> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if file.try_lock().is_err() {
        return Err(io::Error::other(
            "a running process still writes to it; try again when it has ended",
        ));
    }
    // Read, not mapped: a rare repair, and safe on a network file system too.
    let bytes = read_at(&file, 0, file.metadata()?.len())?;
    let parsed = parse(&bytes, 0, |_| {});
    if parsed.damage.is_none() {
        return Ok(false);
    }
    // A new pack of what comes before the damage, in place of this one: never cut in place,
    // since a reader may have this one mapped.
    let folder = path.parent().unwrap_or(Path::new("."));
    if parsed.consumed > 0 {
        let name = format!("{}-{:x}-r{PACK_SUFFIX}", std::process::id(), now_nanos());
        let kept = folder.join(name);
        let written = create_new(&kept)
            .and_then(|new| {
                // Locked while it is written, as a writer's pack is: a compaction meanwhile
                // leaves it alone rather than merging (and removing) what is there so far.
                new.try_lock()
                    .map_err(|_| io::Error::other("cannot lock a new pack"))?;
                new.write_all_at(&bytes[..parsed.consumed], 0)?;
                new.sync_all()
            })
            .and_then(|()| File::open(folder)?.sync_all());
        if let Err(error) = written {
            let _ = fs::remove_file(&kept);
            return Err(error);
        }
    }
    fs::remove_file(path)?;
    if let Some(dir) = folder.parent() {
        if let Ok(generation) = Generation::open(dir, false) {
            generation.bump();
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn record<'a>(kind: Kind, key: &'a CacheKey, body: &'a [&'a [u8]]) -> NewRecord<'a> {
        NewRecord {
            kind,
            key,
            body,
            preview: b"",
            defer: false,
        }
    }

    fn no_dir(dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    #[test]
    fn the_coarse_clock_tells_the_time_to_within_a_second() {
        let (before, coarse, after) = (now_nanos(), now_nanos_coarse(), now_nanos());
        assert!(coarse + 1_000_000_000 > before && coarse < after + 1_000_000_000);
    }

    #[test]
    fn records_round_trip_and_damage_stops_the_reading() {
        let mut bytes = encode(Kind::Entry, 7, &key(1), &[b"ab", b"cd"], b"x=1");
        bytes.extend(encode(Kind::Removed, 8, &key(2), &[], b""));
        let mut seen = Vec::new();
        let parsed = parse(&bytes, 0, |r| {
            seen.push((r.kind, r.written, r.body.to_vec(), r.preview.to_vec()))
        });
        assert_eq!(parsed.consumed, bytes.len());
        assert_eq!(parsed.damage, None);
        assert_eq!(
            seen,
            vec![
                (Kind::Entry, 7, b"abcd".to_vec(), b"x=1".to_vec()),
                (Kind::Removed, 8, Vec::new(), Vec::new())
            ]
        );
        // A record cut short is no damage: it may still be being written.
        let parsed = parse(&bytes[..bytes.len() - 1], 0, |_| {});
        assert_eq!(parsed.damage, None);
        assert_eq!(parsed.consumed, RECORD_HEADER + 4 + 3);
        // Nor are zeros to the end (what a crash can leave after the last whole record).
        let mut zeros = bytes.clone();
        zeros.extend([0; 100]);
        let parsed = parse(&zeros, 0, |_| {});
        assert_eq!((parsed.consumed, parsed.damage), (bytes.len(), None));
        // A changed byte is.
        bytes[RECORD_HEADER + 1] ^= 1;
        let mut count = 0;
        let parsed = parse(&bytes, 0, |_| count += 1);
        assert_eq!((parsed.consumed, count), (0, 0));
        assert!(parsed.damage.unwrap().contains("checksum"));
    }

    #[test]
    fn another_process_records_are_seen_after_the_counter_moves() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        let writer = Arc::new(Packs::new(version.clone(), false));
        let reader = Arc::new(Packs::new(version.clone(), false));
        assert!(matches!(reader.get(&key(1)).unwrap(), Found::Absent));
        writer
            .append(record(Kind::Entry, &key(1), &[b"one"]), &no_dir)
            .unwrap();
        assert!(writer.writing());
        // The reader found the folder without packs a moment ago, which it takes to hold for
        // `ABSENT_FOR` unless it forgets it (as taking a key's lock does).
        reader.forget_absence();
        assert!(matches!(reader.get(&key(1)).unwrap(), Found::Entry(b) if b == b"one"));
        writer
            .append(record(Kind::Removed, &key(1), &[]), &no_dir)
            .unwrap();
        assert!(matches!(reader.get(&key(1)).unwrap(), Found::Absent));
        // The reader's own record after the removal wins.
        reader
            .append(record(Kind::Entry, &key(1), &[b"again"]), &no_dir)
            .unwrap();
        assert!(matches!(writer.get(&key(1)).unwrap(), Found::Entry(b) if b == b"again"));
        // Removal of the folder: both start over.
        mark_removed(&version);
        fs::remove_dir_all(&version).unwrap();
        assert!(matches!(writer.get(&key(1)).unwrap(), Found::Absent));
        writer
            .append(record(Kind::Entry, &key(2), &[b"two"]), &no_dir)
            .unwrap();
        assert!(matches!(reader.get(&key(2)).unwrap(), Found::Entry(b) if b == b"two"));
    }

    #[test]
    fn records_appended_while_others_are_written_keep_their_places() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        let writer = Arc::new(Packs::new(version.clone(), false));
        let body = |n: u32| n.to_le_bytes().repeat(1 + n as usize % 50);
        let key_of = |n: u32| {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&n.to_le_bytes());
            CacheKey::from_bytes(bytes)
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        /// Ends the flushing loop however the appenders end (a failed assertion included).
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        std::thread::scope(|scope| {
            let _done = Done(&done);
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    writer.flush().unwrap();
                }
            });
            let appenders: Vec<_> = (0..4u32)
                .map(|t| {
                    let (writer, body) = (&writer, &body);
                    scope.spawn(move || {
                        for i in 0..1000u32 {
                            let n = t * 1000 + i;
                            let bytes = body(n);
                            let record = NewRecord {
                                kind: Kind::Entry,
                                key: &key_of(n),
                                body: &[&bytes],
                                preview: b"",
                                defer: i % 7 != 0,
                            };
                            writer.append(record, &no_dir).unwrap();
                            // Whether waiting, being written or written: the same bytes.
                            let back = key_of(t * 1000 + i / 2);
                            match writer.get(&back).unwrap() {
                                Found::Entry(found) => assert_eq!(found, body(t * 1000 + i / 2)),
                                other => panic!("{other:?}"),
                            }
                        }
                    })
                })
                .collect();
            for appender in appenders {
                appender.join().unwrap();
            }
        });
        writer.flush().unwrap();
        let reader = Packs::new(version, false);
        for t in 0..4u32 {
            for i in 0..1000u32 {
                let n = t * 1000 + i;
                match reader.get(&key_of(n)).unwrap() {
                    Found::Entry(found) => assert_eq!(found, body(n), "{n}"),
                    other => panic!("{n}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn small_packs_are_merged_without_rewriting_a_larger_one() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        let finished = |keys: std::ops::Range<u8>, len: usize| {
            // Dropped at once: its writer has ended.
            let packs = Arc::new(Packs::new(version.clone(), false));
            for n in keys {
                let body = vec![n; len];
                packs
                    .append(record(Kind::Entry, &key(n), &[&body]), &no_dir)
                    .unwrap();
            }
        };
        finished(0..100, 100);
        let large = pack_paths(&version);
        for first in [200, 210, 220, 230] {
            finished(first..first + 2, 10);
        }
        assert_eq!(pack_paths(&version).len(), 5);
        // Five finished packs and nothing dead: fewer than six leaves them alone.
        compact(&version, 6).unwrap();
        assert_eq!(pack_paths(&version).len(), 5);
        compact(&version, 4).unwrap();
        let after = pack_paths(&version);
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(after.contains(&large[0]), "the large pack is left as it is");
        let reader = Packs::new(version, false);
        for n in (0..100).chain([200, 201, 211, 230, 231]) {
            assert!(
                matches!(reader.get(&key(n)).unwrap(), Found::Entry(b) if b[0] == n),
                "{n}"
            );
        }
    }

    #[test]
    fn merging_keeps_the_latest_use_of_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        fs::create_dir_all(version.join(PACK_DIR)).unwrap();
        fs::write(version.join(GENERATION_FILE), [0u8; 16]).unwrap();
        let mut bytes = encode(Kind::Entry, 10, &key(1), &[b"one"], b"");
        bytes.extend(encode(Kind::Used, 20, &key(1), &[], b""));
        bytes.extend(encode(Kind::Used, 30, &key(1), &[], b""));
        // Dead records, so that the pack is merged.
        for n in 2..6 {
            bytes.extend(encode(Kind::Entry, 11, &key(n), &[&[n; 100]], b""));
            bytes.extend(encode(Kind::Removed, 12, &key(n), &[], b""));
        }
        fs::write(version.join(PACK_DIR).join("1-0.pack"), bytes).unwrap();
        assert!(compact(&version, 4).unwrap() > 0);
        let merged = pack_paths(&version);
        assert_ne!(merged, [version.join(PACK_DIR).join("1-0.pack")]);
        let mut records = Vec::new();
        read_pack(&merged[0], |r| records.push((r.kind, r.written))).unwrap();
        assert_eq!(records, [(Kind::Entry, 10), (Kind::Used, 30)]);
        let contents = contents(&version, false);
        assert_eq!(contents.entries.len(), 1);
        assert_eq!(
            (contents.entries[0].written, contents.entries[0].last_used),
            (10, 30)
        );
        // And the index knows it.
        let reader = Packs::new(version, false);
        assert!(matches!(reader.get(&key(1)).unwrap(), Found::Entry(b) if b == b"one"));
        assert_eq!(reader.get_used(&key(1)).unwrap().1.used, 30);
    }

    /// Packs `1-0` and `2-0` of one small entry each, and a larger `3-0` of `bulk` and 50
    /// entries of 200 bytes (left out of a merge for their number).
    fn two_small_packs_and_a_large_one(version: &Path, small: [Vec<u8>; 2], bulk: Vec<u8>) {
        fs::create_dir_all(version.join(PACK_DIR)).unwrap();
        fs::write(version.join(GENERATION_FILE), [0u8; 16]).unwrap();
        let [one, two] = small;
        fs::write(version.join(PACK_DIR).join("1-0.pack"), one).unwrap();
        fs::write(version.join(PACK_DIR).join("2-0.pack"), two).unwrap();
        let mut large = bulk;
        for n in 10..60 {
            large.extend(encode(Kind::Entry, 60, &key(n), &[&[n; 200]], b""));
        }
        fs::write(version.join(PACK_DIR).join("3-0.pack"), large).unwrap();
    }

    #[test]
    fn a_use_recorded_in_a_pack_left_out_does_not_drop_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        two_small_packs_and_a_large_one(
            &version,
            [
                encode(Kind::Entry, 10, &key(1), &[b"one"], b""),
                encode(Kind::Entry, 11, &key(2), &[b"two"], b""),
            ],
            // Entry 1 read an hour later, by the process that wrote the large pack.
            encode(Kind::Used, 50, &key(1), &[], b""),
        );
        assert_eq!(pack_paths(&version).len(), 3);
        compact(&version, 2).unwrap();
        assert_eq!(pack_paths(&version).len(), 2, "the small packs merged");
        let reader = Packs::new(version, false);
        let (found, seen) = reader.get_used(&key(1)).unwrap();
        assert!(matches!(found, Found::Entry(b) if b == b"one"));
        assert_eq!(seen.used, 50);
        assert!(matches!(reader.get(&key(2)).unwrap(), Found::Entry(b) if b == b"two"));
    }

    #[test]
    fn merging_keeps_the_latest_use_of_an_entry_in_a_pack_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        let mut used = encode(Kind::Used, 50, &key(1), &[], b"");
        used.extend(encode(Kind::Entry, 11, &key(2), &[b"two"], b""));
        two_small_packs_and_a_large_one(
            &version,
            [used, encode(Kind::Entry, 12, &key(3), &[b"three"], b"")],
            encode(Kind::Entry, 10, &key(1), &[b"one"], b""),
        );
        assert_eq!(pack_paths(&version).len(), 3);
        compact(&version, 2).unwrap();
        assert_eq!(pack_paths(&version).len(), 2, "the small packs merged");
        let reader = Packs::new(version, false);
        let (found, seen) = reader.get_used(&key(1)).unwrap();
        assert!(matches!(found, Found::Entry(b) if b == b"one"));
        assert_eq!(seen.used, 50);
    }

    #[test]
    fn a_store_after_the_clock_went_back_still_replaces_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        fs::create_dir_all(version.join(PACK_DIR)).unwrap();
        fs::write(version.join(GENERATION_FILE), [0u8; 16]).unwrap();
        // Written an hour "later" than now: by a process whose clock was ahead, or before this
        // machine's clock was set back.
        let later = now_nanos() + 3_600_000_000_000;
        let old = encode(Kind::Entry, later, &key(1), &[b"old"], b"");
        fs::write(version.join(PACK_DIR).join("1-0.pack"), old).unwrap();
        let packs = Arc::new(Packs::new(version.clone(), false));
        assert!(matches!(packs.get(&key(1)).unwrap(), Found::Entry(b) if b == b"old"));
        packs
            .append(record(Kind::Entry, &key(1), &[b"new"]), &no_dir)
            .unwrap();
        assert!(matches!(packs.get(&key(1)).unwrap(), Found::Entry(b) if b == b"new"));
        // So for another process, and for a removal after it.
        let other = Packs::new(version, false);
        assert!(matches!(other.get(&key(1)).unwrap(), Found::Entry(b) if b == b"new"));
        packs
            .append(record(Kind::Removed, &key(1), &[]), &no_dir)
            .unwrap();
        assert!(matches!(packs.get(&key(1)).unwrap(), Found::Absent));
        assert!(matches!(other.get(&key(1)).unwrap(), Found::Absent));
    }

    #[test]
    fn a_folder_deleted_by_hand_is_made_again_by_a_later_append() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        let packs = Arc::new(Packs::new(version.clone(), false));
        packs
            .append(record(Kind::Entry, &key(1), &[b"one"]), &no_dir)
            .unwrap();
        // Without a word to the processes using it (no `mark_removed`).
        fs::remove_dir_all(&version).unwrap();
        std::thread::sleep(CHECK_EVERY + std::time::Duration::from_millis(20));
        packs
            .append(record(Kind::Entry, &key(2), &[b"two"]), &no_dir)
            .unwrap();
        let reader = Packs::new(version, false);
        assert!(matches!(reader.get(&key(2)).unwrap(), Found::Entry(b) if b == b"two"));
    }

    #[test]
    fn a_counter_replaced_under_a_writer_is_opened_again_by_its_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        let first = Arc::new(Packs::new(version.clone(), false));
        first
            .append(record(Kind::Entry, &key(1), &[b"one"]), &no_dir)
            .unwrap();
        // Another process put a counter of its own in place (as `Generation::replace` does).
        let temporary = version.join("replacing");
        fs::write(&temporary, [0u8; 16]).unwrap();
        fs::rename(&temporary, version.join(GENERATION_FILE)).unwrap();
        let second = Arc::new(Packs::new(version.clone(), false));
        second
            .append(record(Kind::Entry, &key(2), &[b"two"]), &no_dir)
            .unwrap();
        std::thread::sleep(CHECK_EVERY + std::time::Duration::from_millis(20));
        first
            .append(record(Kind::Entry, &key(3), &[b"three"]), &no_dir)
            .unwrap();
        assert!(matches!(first.get(&key(2)).unwrap(), Found::Entry(b) if b == b"two"));
        assert!(matches!(second.get(&key(3)).unwrap(), Found::Entry(b) if b == b"three"));
    }

    #[test]
    fn compaction_keeps_the_newest_record_of_finished_packs() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("v");
        {
            let first = Arc::new(Packs::new(version.clone(), false));
            first
                .append(record(Kind::Entry, &key(1), &[b"one"]), &no_dir)
                .unwrap();
            first
                .append(record(Kind::Entry, &key(2), &[b"two"]), &no_dir)
                .unwrap();
            first
                .append(record(Kind::Removed, &key(2), &[]), &no_dir)
                .unwrap();
            // Still written to: not compacted.
            assert_eq!(compact(&version, 1).unwrap(), 0);
        }
        let reader = Arc::new(Packs::new(version.clone(), false));
        assert!(matches!(reader.get(&key(1)).unwrap(), Found::Entry(_)));
        assert!(compact(&version, 1).unwrap() > 0);
        let contents = contents(&version, true);
        assert_eq!(contents.entries.len(), 1);
        assert_eq!(contents.entries[0].body, b"one");
        assert_eq!(pack_paths(&version).len(), 1);
        // A reader that had the old pack open moves to the new one.
        assert!(matches!(reader.get(&key(1)).unwrap(), Found::Entry(b) if b == b"one"));
        assert!(matches!(reader.get(&key(2)).unwrap(), Found::Absent));
    }
}
