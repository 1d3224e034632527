//! One cached function at run time: keying a call, looking it up, computing and storing it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::deps::{combined_version, DepNode};
use crate::entry::{self, CorruptEntry};
use crate::error::Error;
use crate::flight::{AsyncClaim, Claim, Payload};
use crate::key::{ArgsHasher, CacheKey, CallKey, FunctionKey, Number, ShortArgs};
use crate::lock::{Acquired, KeyLock};
use crate::log;
use crate::memory::{Counters, Memory};
use crate::probe;
use crate::store::{
    function_dir_name, EntryAddress, EntryBytes, Store, TOUCH_AFTER, VERSION_DIR_DIGITS,
};
use crate::tier::{Bytes, Ticket, Tier, TierKey};

/// What the `#[cached]` macro knows about a function at compile time.
#[derive(Debug)]
pub struct FunctionDef {
    /// `module_path!()` where the function is defined (starts with the crate name).
    pub module_path: &'static str,
    /// The function's name.
    pub name: &'static str,
    /// The function-version hash: 64 hex digits of BLAKE3 over the function's normalized tokens
    /// (and the `version = "..."` option).
    pub version: &'static str,
    /// The function's source as compiled (formatted, without comments and doc comments).
    pub source: &'static str,
    /// The functions it declares with `deps(...)`; their versions are folded into its own.
    pub deps: &'static [fn() -> &'static DepNode],
    /// When stored values stop being served (`expire = ...`, `validate = ...`).
    pub freshness: Freshness,
    /// Whether its entries are compressed (`compress = ...`).
    pub compression: Compression,
}

/// A function's compression setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// As its memory says ([`Memory::compression`]).
    Inherit,
    /// Never (`#[cached(compress = false)]`).
    Off,
    /// zstd at this level (`#[cached(compress = 3)]`).
    Level(i32),
}

/// What a validation callback (`#[cached(validate = path)]`) is told about a stored entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryMeta {
    /// When the value was computed.
    pub created: SystemTime,
    /// How long the computation took.
    pub duration: Duration,
    /// The entry's size in bytes.
    pub size: u64,
}

/// When stored values are still served: younger than `expire_after`, and accepted by
/// `validate`. An entry that is not is a miss: recomputed and overwritten.
#[derive(Debug, Clone, Copy, Default)]
pub struct Freshness {
    /// Entries older than this are recomputed (`#[cached(expire = "7d")]`).
    pub expire_after: Option<Duration>,
    /// Entries it returns `false` for are recomputed (`#[cached(validate = path)]`), like
    /// joblib's `cache_validation_callback`.
    pub validate: Option<fn(&EntryMeta) -> bool>,
}

impl Freshness {
    /// Always fresh: no expiry, no callback.
    pub const ALWAYS: Freshness = Freshness {
        expire_after: None,
        validate: None,
    };

    /// Whether it can refuse an entry at all (an expiry or a callback is set): when not, an
    /// entry's times need not be read.
    fn checks(&self) -> bool {
        self.expire_after.is_some() || self.validate.is_some()
    }

    fn accepts(&self, header: &entry::EntryHeader, size: usize) -> bool {
        self.accepts_meta(header.created, header.duration, size as u64)
    }

    fn accepts_meta(&self, created: SystemTime, duration: Duration, size: u64) -> bool {
        if let Some(limit) = self.expire_after {
            let age = SystemTime::now()
                .duration_since(created)
                .unwrap_or_default();
            if age > limit {
                return false;
            }
        }
        match self.validate {
            Some(validate) => validate(&EntryMeta {
                created,
                duration,
                size,
            }),
            None => true,
        }
    }
}

/// What a `#[cached]` function may return: serializable both ways.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a cached result: it must implement `serde::Serialize` and `serde::Deserialize`",
    label = "the result of a #[cached] function is stored, so it must be serializable",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
)]
pub trait CacheValue: Serialize + DeserializeOwned {}

impl<T: Serialize + DeserializeOwned> CacheValue for T {}

/// What a `#[cached]` function may take as an argument: serializable, to be hashed into the key.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of a cache key: it must implement `serde::Serialize`",
    label = "the arguments of a #[cached] function are hashed into its key",
    note = "derive it with `#[derive(serde::Serialize)]`, or wrap the value in a type that does"
)]
pub trait CacheArg: Serialize {}

impl<T: Serialize + ?Sized> CacheArg for T {}

/// What of a function's result is stored, and how a stored value becomes a result again.
#[diagnostic::on_unimplemented(
    message = "this #[cached] option does not fit the return type `{R}`",
    label = "`store_errors` needs a `Result`, `skip_none` an `Option`"
)]
pub trait StorePolicy<R> {
    /// The stored type.
    type Stored: CacheValue;
    /// The part of a result to store, or `None` to store nothing.
    fn stored(result: &R) -> Option<&Self::Stored>;
    /// The result a stored value stands for.
    fn rebuild(stored: Self::Stored) -> R;
}

/// Stores every result as it is.
#[derive(Debug)]
pub enum Plain {}

impl<R: CacheValue> StorePolicy<R> for Plain {
    type Stored = R;
    fn stored(result: &R) -> Option<&R> {
        Some(result)
    }
    fn rebuild(stored: R) -> R {
        stored
    }
}

/// Stores the `Ok` values of a `Result` only: errors are usually transient, and their type need
/// not be serializable.
#[derive(Debug)]
pub enum OkOnly {}

impl<T: CacheValue, E> StorePolicy<Result<T, E>> for OkOnly {
    type Stored = T;
    fn stored(result: &Result<T, E>) -> Option<&T> {
        result.as_ref().ok()
    }
    fn rebuild(stored: T) -> Result<T, E> {
        Ok(stored)
    }
}

/// Stores the `Some` values of an `Option` only.
#[derive(Debug)]
pub enum SomeOnly {}

impl<T: CacheValue> StorePolicy<Option<T>> for SomeOnly {
    type Stored = T;
    fn stored(result: &Option<T>) -> Option<&T> {
        result.as_ref()
    }
    fn rebuild(stored: T) -> Option<T> {
        Some(stored)
    }
}

/// Adds one argument to a call's key.
pub fn hash_arg<T: CacheArg + ?Sized>(hasher: &mut ArgsHasher, value: &T) {
    hasher.arg(value);
}

/// One parameter of a cached function, for generated code to pick how it is hashed: a slice or
/// `Vec` of primitive numbers as raw bytes ([`NumbersArg`], chosen first), anything else through
/// serde ([`SerdeArg`]). The choice is made by method resolution on the parameter's declared
/// type ("autoref specialization"), so one function always keys a parameter the same way.
#[derive(Debug)]
pub struct Arg<'a, T: ?Sized>(pub &'a T);

/// Hashes a parameter that is a slice or `Vec` of primitive numbers with
/// [`ArgsHasher::numbers`].
pub trait NumbersArg {
    /// Adds the parameter to the key.
    fn hash_into(&self, hasher: &mut ArgsHasher);
}

impl<N: Number> NumbersArg for Arg<'_, &[N]> {
    fn hash_into(&self, hasher: &mut ArgsHasher) {
        hasher.numbers(self.0);
    }
}

impl<N: Number> NumbersArg for Arg<'_, &mut [N]> {
    fn hash_into(&self, hasher: &mut ArgsHasher) {
        hasher.numbers(self.0);
    }
}

impl<N: Number> NumbersArg for Arg<'_, Vec<N>> {
    fn hash_into(&self, hasher: &mut ArgsHasher) {
        hasher.numbers(self.0);
    }
}

impl<N: Number> NumbersArg for Arg<'_, &Vec<N>> {
    fn hash_into(&self, hasher: &mut ArgsHasher) {
        hasher.numbers(self.0);
    }
}

impl<N: Number> NumbersArg for Arg<'_, Box<[N]>> {
    fn hash_into(&self, hasher: &mut ArgsHasher) {
        hasher.numbers(self.0);
    }
}

/// Hashes any other parameter through its `Serialize` implementation ([`ArgsHasher::arg`]).
pub trait SerdeArg<T: ?Sized> {
    /// Adds the parameter to the key.
    fn hash_into(&self, hasher: &mut ArgsHasher)
    where
        T: CacheArg;
}

impl<T: ?Sized> SerdeArg<T> for &Arg<'_, T> {
    fn hash_into(&self, hasher: &mut ArgsHasher)
    where
        T: CacheArg,
    {
        hasher.arg(self.0);
    }
}

/// Writes a parameter that is a primitive value (an integer, a float, `bool` or `char`, or a
/// reference to one) into a call's [`ShortArgs`]: generated code's first choice, picked by
/// method resolution as [`NumbersArg`] is. For generated code: not a stable interface.
#[doc(hidden)]
pub trait ShortArg {
    /// Adds the parameter to the short key.
    fn short_into(&self, args: &mut ShortArgs);
}

/// Any other parameter: marks the [`ShortArgs`], so that the call is keyed through an
/// [`ArgsHasher`]. For generated code: not a stable interface.
#[doc(hidden)]
pub trait OtherShortArg {
    /// Marks the short key as not usable.
    fn short_into(&self, args: &mut ShortArgs) {
        args.other();
    }
}

impl<T: ?Sized> OtherShortArg for &Arg<'_, T> {}

/// An [`EntryAddress`] with owned parts.
struct OwnedAddress {
    function: String,
    version: String,
    key: CacheKey,
}

impl OwnedAddress {
    fn at(&self) -> EntryAddress<'_> {
        EntryAddress {
            function: &self.function,
            version: &self.version,
            key: &self.key,
        }
    }
}

/// An entry to write.
struct NewEntry<'a> {
    /// The version's source file, when it is not recorded yet.
    source: Option<&'a str>,
    created: SystemTime,
    duration: Duration,
    /// zstd level, when entries are compressed.
    level: Option<i32>,
    /// The payload, uncompressed.
    plain: &'a [u8],
    /// Its codec's header flags.
    flags: u16,
    /// A short `Debug` form of the arguments, when there is one.
    preview: Option<&'a str>,
}

/// A computed value, encoded, with what its entry records: owned, so that it can be written on
/// another thread.
struct Prepared {
    payload: Payload,
    /// The version's source file, when this process has not recorded it yet.
    source: Option<String>,
    created: SystemTime,
    duration: Duration,
    level: Option<i32>,
    flags: u16,
}

impl Prepared {
    /// The entry to write, with the arguments' preview.
    fn entry<'a>(&'a self, preview: Option<&'a str>) -> NewEntry<'a> {
        NewEntry {
            source: self.source.as_deref(),
            created: self.created,
            duration: self.duration,
            level: self.level,
            plain: &self.payload,
            flags: self.flags,
            preview,
        }
    }
}

/// A value just computed, to store.
struct Computed<'v, S> {
    value: &'v S,
    codec: Codec<S>,
    duration: Duration,
    /// A short `Debug` form of the arguments, when there is one.
    preview: Option<&'v str>,
}

/// Payloads smaller than this are stored as they are: compressing them saves nothing.
const COMPRESS_FROM: usize = 128;

/// Payloads from this size that decode by copying (a `Vec` of numbers) are verified in the pass
/// that decodes them: beyond the core's caches, a second pass would read them from memory again.
const DECODE_CHECKED_FROM: usize = 1 << 20;

/// Writes a version's source file (when given) and an entry, compressed when asked and worth it;
/// returns the bytes the entry takes.
fn write_entry(
    store: &dyn Store,
    at: &EntryAddress<'_>,
    entry: &NewEntry<'_>,
) -> Result<u64, Error> {
    if let Some(text) = entry.source {
        store.save_source(at.function, at.version, text)?;
    }
    let compressed = match entry.level {
        Some(level) if entry.plain.len() >= COMPRESS_FROM => {
            entry::compress(entry.plain, level).ok()
        }
        _ => None,
    };
    let (flags, stored) = match &compressed {
        Some(bytes) => (entry.flags | entry::FLAG_ZSTD, bytes.as_slice()),
        None => (entry.flags, entry.plain),
    };
    let header =
        entry::encode_header_with_flags(at.key, entry.created, entry.duration, flags, stored);
    store.write(at, &header, stored, entry.preview)?;
    Ok((header.len() + stored.len()) as u64)
}

/// A hit read from disk: the value, what its header said, and its plain payload when asked for
/// (to keep in the memory tier).
struct DiskHit<R> {
    value: R,
    created: SystemTime,
    duration: Duration,
    size: u64,
    plain: Option<Bytes>,
}

/// What [`read_stored`] found.
enum Stored<R> {
    Hit(DiskHit<R>),
    Absent,
    /// Intact, but expired or refused by the validation callback.
    Stale,
    OtherVersion(u16),
    Broken(Error),
}

/// Reads, verifies and decodes one entry; reports nothing, so it can run on any thread. A hit's
/// plain payload is copied for the memory tier when it has at most `keep_plain` bytes.
fn read_stored<R>(
    store: &dyn Store,
    at: &EntryAddress<'_>,
    freshness: Freshness,
    keep_plain: usize,
    codec: Codec<R>,
) -> Stored<R> {
    let bytes = match store.read(at) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Stored::Absent,
        Err(error) => return Stored::Broken(error),
    };
    let corrupt = |reason| {
        let path = store.describe(at);
        Stored::Broken(Error::Corrupt { path, reason })
    };
    let (header, payload, mut checksum) = match entry::decode_deferred(&bytes, at.key) {
        Ok(deferred) => deferred,
        Err(CorruptEntry::OtherVersion { found }) => return Stored::OtherVersion(found),
        Err(reason) => return corrupt(reason),
    };
    // A large payload that decodes by copying is verified in the same pass, by the codecs that
    // can (`decode_checked`); any other is verified first.
    let large = !header.compressed
        && header.numbers
        && payload.len() >= DECODE_CHECKED_FROM.max(keep_plain.saturating_add(1));
    let decoded = large
        .then(|| codec.decode_checked(payload, &mut checksum))
        .flatten();
    if decoded.is_none() {
        checksum.update_rest(payload);
    }
    if let Err(reason) = checksum.verify() {
        return corrupt(reason);
    }
    if !freshness.accepts(&header, bytes.len()) {
        return Stored::Stale;
    }
    let size = bytes.len();
    let first_read = matches!(bytes, EntryBytes::FirstRead(_));
    let broken = |message: String| {
        Stored::Broken(Error::Decode {
            path: store.describe(at),
            type_name: std::any::type_name::<R>(),
            message,
        })
    };
    if header.numbers != (codec.flags() & entry::FLAG_NUMBERS != 0) {
        return broken("the entry's payload format is not the one of the return type".to_owned());
    }
    let hit = |value, plain: Option<Bytes>| {
        Stored::Hit(DiskHit {
            value,
            created: header.created,
            duration: header.duration,
            size: size as u64,
            plain,
        })
    };
    match decoded {
        Some(Ok(value)) => return hit(value, None),
        Some(Err(message)) => return broken(message),
        None => {}
    }
    // A mapped, uncompressed entry: read in place by the types that can (checksum verified).
    let bytes = match bytes {
        EntryBytes::Mapped(map) if !header.compressed => {
            let map = Arc::new(map);
            match codec.decode_mapped(Arc::clone(&map), entry::HEADER_LEN..size) {
                Some(Ok(value)) => return hit(value, None),
                Some(Err(message)) => return broken(message),
                None => EntryBytes::Shared(map),
            }
        }
        bytes => bytes,
    };
    let payload = &bytes[entry::HEADER_LEN..];
    let plain = match entry::plain_payload(&header, payload) {
        Ok(plain) => plain,
        Err(reason) => {
            let path = store.describe(at);
            return Stored::Broken(Error::Corrupt { path, reason });
        }
    };
    match codec.decode(&plain) {
        Ok(value) => {
            // Small ones are kept inline in the memory tier's slot: no allocation.
            // Not before a second read (see `EntryBytes::FirstRead`).
            let kept = (!first_read && plain.len() <= keep_plain).then(|| Bytes::new(plain));
            hit(value, kept)
        }
        Err(message) => broken(message),
    }
}

/// What a look-up found.
enum Lookup<R> {
    Hit(R),
    /// No entry.
    Absent,
    /// An entry that cannot be used (already reported).
    Broken,
}

/// How a call treats the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallMode {
    /// Serve a stored value, or compute and store it.
    Cached,
    /// Compute and store, replacing any stored value.
    Refresh,
    /// Compute only; neither read nor write the cache.
    Uncached,
}

/// The run-time state of one `#[cached]` function. The macro creates one per function, in a
/// `static`.
#[derive(Debug)]
pub struct CachedFunction {
    def: FunctionDef,
    names: OnceLock<Names>,
    version: OnceLock<String>,
    function_key: OnceLock<FunctionKey>,
    /// Whether a failed write was warned about (the cache cannot be written, it seems).
    write_warned: AtomicBool,
    /// Whether an argument that cannot be serialized was warned about.
    unkeyed_warned: AtomicBool,
    /// Whether a value that cannot be serialized was warned about.
    unencoded_warned: AtomicBool,
    /// Computations of this function in this process, and how many of them took
    /// [`LOCK_FROM`] or longer.
    computed: AtomicU64,
    slow: AtomicU64,
    /// Its number in this process, given at first use (0 until then): see [`CachedFunction::id`].
    id: AtomicUsize,
}

/// The next number [`CachedFunction::id`] gives (from 1; 0 stands for none yet).
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// A miss takes the key's cross-process lock (so that processes missing the same key at once
/// compute it once) unless the function is quick: all but at most one in 16 of its
/// computations in this process took less than this (and there was one). Then the lock would
/// cost more than the duplicate work it can save, and the function runs at once (storing stays
/// atomic; two processes missing the same key at the same moment may both compute it).
pub const LOCK_FROM: Duration = Duration::from_micros(200);

#[derive(Debug)]
struct Names {
    identity: String,
    dir: String,
}

impl CachedFunction {
    /// Wraps the macro's facts about a function.
    pub const fn new(def: FunctionDef) -> Self {
        CachedFunction {
            def,
            names: OnceLock::new(),
            version: OnceLock::new(),
            function_key: OnceLock::new(),
            write_warned: AtomicBool::new(false),
            unkeyed_warned: AtomicBool::new(false),
            unencoded_warned: AtomicBool::new(false),
            computed: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            id: AtomicUsize::new(0),
        }
    }

    /// The facts the macro recorded.
    pub fn def(&self) -> &FunctionDef {
        &self.def
    }

    fn names(&self) -> &Names {
        self.names.get_or_init(|| {
            let identity = format!("{}::{}", self.def.module_path, self.def.name);
            let dir = function_dir_name(&identity);
            Names { identity, dir }
        })
    }

    /// The function's version: its own hash, with its dependencies' folded in (64 hex digits).
    pub fn version(&self) -> &str {
        self.version
            .get_or_init(|| combined_version(self.def.version, self.def.deps))
    }

    /// The function's path, e.g. `my_crate::physics::simulate`.
    pub fn identity(&self) -> &str {
        &self.names().identity
    }

    /// The folder holding this version's entries in `memory`, or `None` when it is disabled.
    pub fn location(&self, memory: &Memory) -> Option<PathBuf> {
        memory
            .store()
            .map(|store| store.version_location(&self.names().dir, self.version()))
    }

    /// Hashes a call's arguments into its key. `None` when the cache is not used for this call:
    /// the memory is disabled, the mode is [`CallMode::Uncached`], or an argument failed to
    /// serialize (reported as a warning, or a panic in strict mode).
    pub fn key(
        &self,
        memory: &Memory,
        mode: CallMode,
        args: impl FnOnce(&mut ArgsHasher),
    ) -> Option<CallKey> {
        if mode == CallMode::Uncached || memory.store().is_none() {
            return None;
        }
        let mut hasher = ArgsHasher::for_function(self.function_key());
        args(&mut hasher);
        self.take_key(memory, &mut hasher)
    }

    /// [`CachedFunction::key`] for arguments that can be hashed more than once (generated code
    /// uses it unless the key is a `key = ...` expression or the function is `async`). The same
    /// key, found sooner when a large slice of floats is among the arguments: its bytes are
    /// hashed as they are, without first looking for NaNs (which all key alike, so the
    /// canonical key hashes each as the one canonical NaN), and that key is kept when an entry
    /// is stored under it, which proves it canonical (see [`ArgsHasher`]'s optimistic mode) and
    /// is the common case of a hit. Otherwise the slices are looked at, and only when one holds
    /// a NaN are the arguments hashed again in canonical form.
    pub fn key_checked(
        &self,
        memory: &Memory,
        mode: CallMode,
        args: impl Fn(&mut ArgsHasher),
    ) -> Option<CallKey> {
        if mode == CallMode::Uncached || memory.store().is_none() {
            return None;
        }
        let function = self.function_key();
        let mut hasher = ArgsHasher::optimistic(function);
        args(&mut hasher);
        let unchecked = hasher.unchecked();
        let key = self.take_key(memory, &mut hasher)?;
        if !unchecked || self.contains(memory, &key) {
            return Some(key);
        }
        let mut checker = ArgsHasher::checking();
        args(&mut checker);
        if !checker.nan_seen() {
            return Some(key);
        }
        let mut hasher = ArgsHasher::for_function(function);
        args(&mut hasher);
        self.take_key(memory, &mut hasher)
    }

    /// The call's key for generated code that wrote the arguments into `short` first: made from
    /// it when every parameter was a primitive value (the key [`CachedFunction::key`] gives,
    /// without the serializer); otherwise `hashed` keys the call ([`CachedFunction::key_checked`]
    /// or [`CachedFunction::key`] through an [`ArgsHasher`]). For generated code.
    #[doc(hidden)]
    #[inline]
    pub fn key_short(
        &self,
        memory: &Memory,
        mode: CallMode,
        short: ShortArgs,
        hashed: impl FnOnce() -> Option<CallKey>,
    ) -> Option<CallKey> {
        if mode == CallMode::Uncached || memory.store().is_none() {
            return None;
        }
        match short.call_key(self.function_key()) {
            Some(key) => Some(key),
            None => hashed(),
        }
    }

    fn function_key(&self) -> &FunctionKey {
        self.function_key
            .get_or_init(|| FunctionKey::new(self.identity(), self.version()))
    }

    /// The key the hasher made, or `None` after reporting why there is none.
    fn take_key(&self, memory: &Memory, hasher: &mut ArgsHasher) -> Option<CallKey> {
        match hasher.take_call() {
            Ok(key) => Some(key),
            Err(source) => {
                let function = self.identity().to_owned();
                let error = Error::Key { function, source };
                self.problem_once(memory, error, NOT_CACHED, &self.unkeyed_warned);
                None
            }
        }
    }

    /// Whether anything is stored under `key`, in memory or in the store, without reading it
    /// (whole, fresh or not).
    fn contains(&self, memory: &Memory, call: &CallKey) -> bool {
        let Some(store) = memory.store() else {
            return false;
        };
        let key = call.digest();
        let in_memory = memory
            .tier
            .as_ref()
            .is_some_and(|tier| tier.contains(&TierKey::new(self.id(), call, || key)));
        in_memory || store.contains(&self.address(&key))
    }

    /// Runs one call: serves the stored value for `key`, or runs `compute`, stores its value
    /// and returns it. Simultaneous misses on one key in this process compute once.
    pub fn call<R, P, F>(
        &self,
        memory: &Memory,
        mode: CallMode,
        key: Option<CallKey>,
        preview: &OnceLock<String>,
        codec: Codec<P::Stored>,
        compute: F,
    ) -> R
    where
        P: StorePolicy<R>,
        F: FnOnce() -> R,
    {
        let probing = probe::probing();
        probe::record_call();
        let (Some(call), Some(store)) = (key, memory.store()) else {
            if probing {
                probe::miss(None);
            }
            return compute();
        };
        let mut digest = None;
        let tier_key = TierKey::new(self.id(), &call, || *digest.insert(call.digest()));
        if mode == CallMode::Cached {
            if let Some(value) = self.memory_hit(memory, store, &tier_key, &call, codec) {
                return P::rebuild(value);
            }
        }
        let key = digest.unwrap_or_else(|| call.digest());
        let at = self.address(&key);
        // Whether the value may appear on disk while we wait to compute: only when nothing was
        // there (a broken entry is not rewritten by anyone but its next computer).
        let mut absent = true;
        if mode == CallMode::Cached {
            match self.lookup::<P::Stored>(memory, store, &at, &tier_key, codec) {
                Lookup::Hit(value) => return P::rebuild(value),
                Lookup::Absent => {}
                Lookup::Broken => absent = false,
            }
        }
        if probing {
            probe::miss(Some(key));
        }
        loop {
            match memory.flights.claim(key) {
                Claim::Reentrant => {
                    Counters::bump(&memory.counters.misses);
                    return compute();
                }
                // A refresh does not take the value of a computation that began before it: it
                // claims the key again, now that that one has finished.
                Claim::Waited(Some(_)) if mode == CallMode::Refresh => {}
                Claim::Waited(Some(payload)) => {
                    if let Some(value) = self.decode_payload(memory, store, &at, &payload, codec) {
                        Counters::bump(&memory.counters.hits);
                        probe::record_hit(std::time::Duration::ZERO);
                        return P::rebuild(value);
                    }
                }
                Claim::Waited(None) => {
                    // The other thread panicked or could not encode its value: look again, and
                    // compute if the value is still missing.
                    absent = false;
                    if mode == CallMode::Cached {
                        if let Lookup::Hit(value) =
                            self.lookup(memory, store, &at, &tier_key, codec)
                        {
                            return P::rebuild(value);
                        }
                    }
                }
                Claim::Owner(flight) => {
                    // This thread computes the key for the process; now for all processes.
                    let mut may_be_stored = absent;
                    let lock = if self.needs_lock() {
                        let acquired = store.lock(&at, memory.lock_timeout_value());
                        self.take_lock(memory, acquired, &mut may_be_stored)
                    } else {
                        // Nothing was waited for: the look-up above is as recent as can be.
                        may_be_stored = false;
                        None
                    };
                    // Another thread or process may have stored the value meanwhile.
                    if mode == CallMode::Cached && may_be_stored {
                        if let Lookup::Hit(value) =
                            self.lookup(memory, store, &at, &tier_key, codec)
                        {
                            drop(lock);
                            flight.finish(None);
                            return P::rebuild(value);
                        }
                    }
                    let started = Instant::now();
                    let value = compute();
                    let duration = started.elapsed();
                    self.note_duration(duration);
                    Counters::bump(&memory.counters.misses);
                    let payload = match P::stored(&value) {
                        Some(stored) => {
                            let computed = Computed {
                                value: stored,
                                codec,
                                duration,
                                preview: preview.get().map(String::as_str),
                            };
                            self.save(memory, store, &at, &tier_key, computed)
                        }
                        None => None,
                    };
                    // Released only now, so that a waiting process finds the entry stored.
                    drop(lock);
                    flight.finish(payload);
                    return value;
                }
            }
        }
    }

    /// [`CachedFunction::call`] for `async fn`: the same cache, never blocking the executor.
    /// Reading and decoding an entry, writing one, and waiting for another process's lock run on
    /// a thread pool of their own (the `blocking` crate, which works under any executor);
    /// simultaneous misses on one key in this process await the first computation.
    pub async fn call_async<R, P, Fut>(
        &self,
        memory: &Memory,
        mode: CallMode,
        key: Option<CallKey>,
        preview: &OnceLock<String>,
        codec: Codec<P::Stored>,
        compute: Fut,
    ) -> R
    where
        P: StorePolicy<R>,
        P::Stored: Send + 'static,
        Fut: Future<Output = R>,
    {
        probe::record_call();
        let (Some(call), Some(store)) = (key, memory.store_arc()) else {
            return compute.await;
        };
        let key = call.digest();
        let tier_key = TierKey::new(self.id(), &call, || key);
        let mut absent = true;
        if mode == CallMode::Cached {
            if let Some(value) = self.memory_hit(memory, &*store, &tier_key, &call, codec) {
                return P::rebuild(value);
            }
            match self
                .lookup_async::<P::Stored>(memory, &store, key, tier_key, codec)
                .await
            {
                Lookup::Hit(value) => return P::rebuild(value),
                Lookup::Absent => {}
                Lookup::Broken => absent = false,
            }
        }
        loop {
            match memory.flights.claim_async(key) {
                AsyncClaim::Wait(wait) => {
                    let waited = wait.await;
                    if mode == CallMode::Refresh {
                        // As in `call`: a refresh claims the key again.
                        continue;
                    }
                    if let Some(payload) = waited {
                        let at = self.address(&key);
                        if let Some(value) =
                            self.decode_payload(memory, &*store, &at, &payload, codec)
                        {
                            Counters::bump(&memory.counters.hits);
                            return P::rebuild(value);
                        }
                    } else if mode == CallMode::Cached {
                        absent = false;
                        if let Lookup::Hit(value) = self
                            .lookup_async(memory, &store, key, tier_key, codec)
                            .await
                        {
                            return P::rebuild(value);
                        }
                    }
                }
                AsyncClaim::Owner(flight) => {
                    let mut may_be_stored = absent;
                    let address = self.owned_address(key);
                    let timeout = memory.lock_timeout_value();
                    let locking = Arc::clone(&store);
                    let acquired =
                        blocking::unblock(move || locking.lock(&address.at(), timeout)).await;
                    let lock = self.take_lock(memory, acquired, &mut may_be_stored);
                    if mode == CallMode::Cached && may_be_stored {
                        if let Lookup::Hit(value) = self
                            .lookup_async(memory, &store, key, tier_key, codec)
                            .await
                        {
                            drop(lock);
                            flight.finish(None);
                            return P::rebuild(value);
                        }
                    }
                    let started = Instant::now();
                    let value = compute.await;
                    let duration = started.elapsed();
                    Counters::bump(&memory.counters.misses);
                    let payload = match P::stored(&value) {
                        Some(stored) => {
                            let computed = Computed {
                                value: stored,
                                codec,
                                duration,
                                preview: preview.get().map(String::as_str),
                            };
                            self.save_async(memory, &store, key, tier_key, computed)
                                .await
                        }
                        None => None,
                    };
                    drop(lock);
                    flight.finish(payload);
                    return value;
                }
            }
        }
    }

    /// Whether a miss takes the cross-process lock: unless the function is quick
    /// ([`LOCK_FROM`]). A computation delayed once (the thread preempted, say) does not make a
    /// quick function slow.
    fn needs_lock(&self) -> bool {
        let computed = self.computed.load(Ordering::Relaxed);
        computed == 0 || self.slow.load(Ordering::Relaxed) * 16 > computed
    }

    fn note_duration(&self, duration: Duration) {
        self.computed.fetch_add(1, Ordering::Relaxed);
        if duration >= LOCK_FROM {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// This function's identity in this process (the memory tier, the sources recorded): a
    /// number of its own, given at its first use and never given again. (Not its address: a
    /// `CachedFunction` made outside a static, then dropped, may leave its address to another
    /// function, which must not find its values in the memory tier.)
    fn id(&self) -> usize {
        match self.id.load(Ordering::Relaxed) {
            0 => self.first_id(),
            id => id,
        }
    }

    /// Gives [`CachedFunction::id`] its number (the first thread to get there sets it).
    #[cold]
    fn first_id(&self) -> usize {
        let fresh = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        match self
            .id
            .compare_exchange(0, fresh, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => fresh,
            Err(given) => given,
        }
    }

    /// A hit from the memory tier: decoded from the kept payload, when it is there and still
    /// fresh. Refreshes the entry's time on disk when this process last did long ago.
    fn memory_hit<R>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        tier_key: &TierKey,
        call: &CallKey,
        codec: Codec<R>,
    ) -> Option<R> {
        let tier = memory.tier.as_ref()?;
        let freshness = self.def.freshness;
        // Checked and decoded without the tier's lock: both may run the user's code (a
        // validation callback, `Deserialize`), which may call cached functions.
        let kept = tier.get(tier_key, TOUCH_AFTER)?;
        let facts = kept.facts;
        let fresh = !freshness.checks()
            || freshness.accepts_meta(facts.created(), facts.duration(), facts.size());
        let Some(value) = fresh.then(|| codec.decode(&kept.payload).ok()).flatten() else {
            tier.discard(tier_key, &kept);
            return None;
        };
        if kept.touch {
            store.touch(&self.address(&call.digest()));
        }
        // Counted once: `Stats::hits` adds the memory hits to the others (one shared counter
        // bumped per hit, not two, when threads hit at once).
        Counters::bump(&memory.counters.memory_hits);
        probe::record_hit(facts.duration());
        Some(value)
    }

    /// The address of an entry, owned, for work on other threads.
    fn owned_address(&self, key: CacheKey) -> OwnedAddress {
        OwnedAddress {
            function: self.names().dir.clone(),
            version: self.version().to_owned(),
            key,
        }
    }

    /// What taking the cross-process lock gave: the lock, or nothing (after reporting why).
    fn take_lock(
        &self,
        memory: &Memory,
        acquired: Result<Acquired, Error>,
        may_be_stored: &mut bool,
    ) -> Option<KeyLock> {
        match acquired {
            Ok(Acquired::Lock { lock, waited }) => {
                *may_be_stored |= waited;
                Some(lock)
            }
            Ok(Acquired::TimedOut) => {
                log::warn(&format!(
                    "`{}`: another process has been computing the same call for longer than the \
                     lock timeout; computing it here too",
                    self.identity()
                ));
                *may_be_stored = true;
                None
            }
            Err(error) => {
                self.write_problem(memory, error);
                None
            }
        }
    }

    /// [`CachedFunction::lookup`] on the blocking thread pool.
    async fn lookup_async<S: CacheValue + Send + 'static>(
        &self,
        memory: &Memory,
        store: &Arc<dyn Store>,
        key: CacheKey,
        tier_key: TierKey,
        codec: Codec<S>,
    ) -> Lookup<S> {
        let address = self.owned_address(key);
        let store = Arc::clone(store);
        let freshness = self.def.freshness;
        let keep = memory.tier.as_ref().map_or(0, Tier::largest);
        let ticket = memory.tier.as_ref().map(|tier| tier.ticket(&tier_key));
        let found = blocking::unblock(move || {
            read_stored::<S>(&*store, &address.at(), freshness, keep, codec)
        })
        .await;
        let found = self.report(memory, &tier_key, ticket, found);
        if let Lookup::Hit(_) = found {
            Counters::bump(&memory.counters.hits);
        }
        found
    }

    /// [`CachedFunction::save`] with the writes on the blocking thread pool (encoding stays here:
    /// the value is borrowed).
    async fn save_async<S>(
        &self,
        memory: &Memory,
        store: &Arc<dyn Store>,
        key: CacheKey,
        tier_key: TierKey,
        computed: Computed<'_, S>,
    ) -> Option<Payload> {
        let preview = computed.preview.map(str::to_owned);
        let prepared = self.prepare(memory, computed)?;
        let address = self.owned_address(key);
        let writer = Arc::clone(store);
        let (prepared, result) = blocking::unblock(move || {
            let result = write_entry(&*writer, &address.at(), &prepared.entry(preview.as_deref()));
            (prepared, result)
        })
        .await;
        self.stored(memory, tier_key, &prepared, result);
        Some(prepared.payload)
    }

    /// Whether an intact entry for `key` is stored: present, of this format, for this key, with a
    /// matching checksum. (Its payload is not decoded: that happens on the call.)
    pub fn is_cached(&self, memory: &Memory, key: Option<CallKey>) -> bool {
        let (Some(call), Some(store)) = (key, memory.store()) else {
            return false;
        };
        let key = call.digest();
        match store.read(&self.address(&key)) {
            Ok(Some(bytes)) => entry::decode(&bytes, &key)
                .is_ok_and(|(header, _)| self.def.freshness.accepts(&header, bytes.len())),
            _ => false,
        }
    }

    /// Removes every stored entry of this function, all versions.
    pub fn clear(&self, memory: &Memory) -> Result<(), Error> {
        // The next store records the source again, in the folder made anew.
        memory.forget_saved_source(self.id());
        let cleared = match memory.store_to_clear() {
            Some(store) => store.clear_function(&self.names().dir),
            None => Ok(()),
        };
        // After the disk: a value read from it meanwhile is not kept in memory (see `Ticket`).
        if let Some(tier) = &memory.tier {
            tier.remove_function(self.id());
        }
        cleared
    }

    /// Removes every version of this function but the one compiled in now.
    pub fn clear_stale(&self, memory: &Memory) -> Result<(), Error> {
        let Some(store) = memory.store_to_clear() else {
            return Ok(());
        };
        let dir = &self.names().dir;
        let current = self
            .version()
            .get(..VERSION_DIR_DIGITS)
            .unwrap_or(self.version());
        for (function, version) in store.versions() {
            if function == *dir && version != current {
                store.remove_version(&function, &version)?;
            }
        }
        Ok(())
    }

    fn address<'a>(&'a self, key: &'a CacheKey) -> EntryAddress<'a> {
        EntryAddress {
            function: &self.names().dir,
            version: self.version(),
            key,
        }
    }

    fn lookup<R>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
        tier_key: &TierKey,
        codec: Codec<R>,
    ) -> Lookup<R> {
        let found = self.read_entry(memory, store, at, tier_key, codec);
        if let Lookup::Hit(_) = found {
            Counters::bump(&memory.counters.hits);
        }
        found
    }

    fn read_entry<R>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
        tier_key: &TierKey,
        codec: Codec<R>,
    ) -> Lookup<R> {
        let keep = memory.tier.as_ref().map_or(0, Tier::largest);
        let ticket = memory.tier.as_ref().map(|tier| tier.ticket(tier_key));
        let found = read_stored(store, at, self.def.freshness, keep, codec);
        self.report(memory, tier_key, ticket, found)
    }

    /// Turns what [`read_stored`] found into a look-up, reporting a broken entry. `ticket`: the
    /// memory tier's, taken before the reading.
    fn report<R>(
        &self,
        memory: &Memory,
        key: &TierKey,
        ticket: Option<Ticket>,
        found: Stored<R>,
    ) -> Lookup<R> {
        match found {
            Stored::Hit(hit) => {
                probe::record_hit(hit.duration);
                if let (Some(tier), Some(ticket), Some(plain)) = (&memory.tier, ticket, hit.plain) {
                    tier.insert_read(*key, ticket, plain, hit.created, hit.duration, hit.size);
                }
                Lookup::Hit(hit.value)
            }
            Stored::Absent => Lookup::Absent,
            Stored::Stale => {
                tracing::debug!(target: "memo", function = self.identity(), "entry expired");
                Lookup::Broken
            }
            Stored::OtherVersion(found) => {
                // Written by another version of memo: not an error, just not ours to read.
                tracing::debug!(target: "memo", found, "entry of another format version");
                Lookup::Broken
            }
            Stored::Broken(error) => {
                // A cache that cannot be written keeps its broken entries, and every call would
                // find them again: once this function's writes were warned about failing, they
                // are counted and logged at debug level.
                if self.write_warned.load(Ordering::Relaxed) && !memory.is_strict() {
                    Counters::bump(&memory.counters.errors);
                    tracing::debug!(target: "memo", "{error}; {RECOMPUTING}");
                } else {
                    self.problem(memory, error, RECOMPUTING);
                }
                Lookup::Broken
            }
        }
    }

    fn decode_payload<R>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
        payload: &[u8],
        codec: Codec<R>,
    ) -> Option<R> {
        match codec.decode(payload) {
            Ok(value) => Some(value),
            Err(message) => {
                let error = Error::Decode {
                    path: store.describe(at),
                    type_name: std::any::type_name::<R>(),
                    message,
                };
                self.problem(memory, error, RECOMPUTING);
                None
            }
        }
    }

    /// Encodes and stores a computed value; returns the payload for waiting threads.
    fn save<S>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
        tier_key: &TierKey,
        computed: Computed<'_, S>,
    ) -> Option<Payload> {
        let preview = computed.preview;
        let prepared = self.prepare(memory, computed)?;
        let result = write_entry(store, at, &prepared.entry(preview));
        self.stored(memory, *tier_key, &prepared, result);
        Some(prepared.payload)
    }

    /// Encodes a computed value (`None`, reported, when it cannot be) with what its entry
    /// records.
    fn prepare<S>(&self, memory: &Memory, computed: Computed<'_, S>) -> Option<Prepared> {
        Some(Prepared {
            payload: self.encode(memory, computed.value, computed.codec)?,
            source: self.source_to_save(memory),
            created: SystemTime::now(),
            duration: computed.duration,
            level: self.compression(memory),
            flags: computed.codec.flags(),
        })
    }

    /// The zstd level entries are written with: the function's `compress` option, else the
    /// memory's [`Memory::compression`].
    fn compression(&self, memory: &Memory) -> Option<i32> {
        match self.def.compression {
            Compression::Inherit => memory.compression_level(),
            Compression::Off => None,
            Compression::Level(level) => Some(level),
        }
    }

    /// The value in the entry payload format, or `None` (reported) when it cannot be encoded.
    fn encode<S>(&self, memory: &Memory, value: &S, codec: Codec<S>) -> Option<Payload> {
        match codec.encode(value) {
            Ok(payload) => Some(Arc::new(payload)),
            Err(message) => {
                let function = self.identity().to_owned();
                let error = Error::Encode { function, message };
                self.problem_once(memory, error, NOT_CACHED, &self.unencoded_warned);
                None
            }
        }
    }

    /// The text of this version's `source.rs` when this process has not recorded it yet in
    /// `memory`.
    fn source_to_save(&self, memory: &Memory) -> Option<String> {
        memory.first_store_of(self.id()).then(|| {
            format!(
                "// memo: source of `{}`, version {}\n{}",
                self.identity(),
                self.version(),
                self.def.source
            )
        })
    }

    /// Counts or reports the outcome of a store, keeping a stored value in the memory tier; after
    /// the first store of this version in the process, cleans what dead processes left in its
    /// folders.
    fn stored(
        &self,
        memory: &Memory,
        tier_key: TierKey,
        prepared: &Prepared,
        result: Result<u64, Error>,
    ) {
        match result {
            Ok(bytes) => {
                if let Some(tier) = &memory.tier {
                    let payload = Arc::clone(&prepared.payload);
                    let (created, duration) = (prepared.created, prepared.duration);
                    tier.insert(tier_key, payload, created, duration, bytes);
                }
                Counters::bump(&memory.counters.stores);
                memory.note_stored(bytes);
            }
            Err(error) => {
                if prepared.source.is_some() {
                    // Not stored: the next store writes the source again.
                    memory.forget_saved_source(self.id());
                }
                self.write_problem(memory, error);
            }
        }
        if prepared.source.is_some() {
            memory.clean_in_background(&self.names().dir, self.version());
        }
    }

    /// A failed write: warned once per function (a read-only or full disk would otherwise warn on
    /// every call), then at debug level.
    fn write_problem(&self, memory: &Memory, error: Error) {
        self.problem_once(memory, error, NOT_STORED, &self.write_warned);
    }

    /// A problem warned about once per function (`warned`), then logged at debug level.
    fn problem_once(&self, memory: &Memory, error: Error, consequence: &str, warned: &AtomicBool) {
        if memory.is_strict() || !warned.swap(true, Ordering::Relaxed) {
            self.problem(memory, error, consequence);
        } else {
            Counters::bump(&memory.counters.errors);
            tracing::debug!(target: "memo", "{error}");
        }
    }

    /// Reports a tolerated problem: counted, then a warning, or a panic in strict mode.
    fn problem(&self, memory: &Memory, error: Error, consequence: &str) {
        Counters::bump(&memory.counters.errors);
        if memory.is_strict() {
            panic!("memo (strict mode) in `{}`: {error}", self.identity());
        }
        log::warn(&format!("{error}; {consequence}"));
    }
}

const RECOMPUTING: &str = "treated as a miss, the value is recomputed";
const NOT_CACHED: &str = "the value is computed and returned, but not cached; further such \
                          failures of this function are logged at debug level";
const NOT_STORED: &str = "the value is returned but not stored; further write failures of this function, and the broken entries it cannot replace, are logged at debug level";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SerdeCodec;

    fn def(version: &'static str) -> FunctionDef {
        FunctionDef {
            module_path: "memo_runtime::function::tests",
            name: "square",
            version,
            source: "fn square(x: u64) -> u64 { x * x }",
            deps: &[],
            freshness: Freshness {
                expire_after: None,
                validate: None,
            },
            compression: Compression::Inherit,
        }
    }

    /// Calls `function(5)`, whose body returns `value`; whether the body ran.
    fn call(function: &CachedFunction, memory: &Memory, value: u64) -> (u64, bool) {
        let ran = std::cell::Cell::new(false);
        let key = function.key_checked(memory, CallMode::Cached, |hasher| hash_arg(hasher, &5u64));
        let codec = (&crate::codec::CodecFor::<u64>::NEW).codec();
        let returned = function.call::<u64, Plain, _>(
            memory,
            CallMode::Cached,
            key,
            &OnceLock::new(),
            codec,
            || {
                ran.set(true);
                value
            },
        );
        (returned, ran.get())
    }

    /// A function made where another one was (the same address, another version) has slots of
    /// its own in the memory tier: it does not get the other's values.
    #[test]
    fn a_function_at_a_used_address_does_not_get_the_last_ones_values() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Memory::new(dir.path());
        let mut function = CachedFunction::new(def(
            "1111111111111111111111111111111111111111111111111111111111111111",
        ));
        let first = &function as *const CachedFunction as usize;
        assert_eq!(call(&function, &memory, 25), (25, true));
        assert_eq!(call(&function, &memory, 26), (25, false));
        // Kept in the memory tier: the second call did not read the disk.
        assert!(memory.stats().memory_hits >= 1);

        function = CachedFunction::new(def(
            "2222222222222222222222222222222222222222222222222222222222222222",
        ));
        assert_eq!(&function as *const CachedFunction as usize, first);
        assert_eq!(call(&function, &memory, 99), (99, true));
        assert_eq!(call(&function, &memory, 100), (99, false));
    }
}
