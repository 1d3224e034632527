//! One cached function at run time: keying a call, looking it up, computing and storing it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::deps::{combined_version, DepNode};
use crate::entry::{self, CorruptEntry};
use crate::error::Error;
use crate::flight::{Claim, Payload};
use crate::key::{ArgsHasher, CacheKey};
use crate::lock::Acquired;
use crate::log;
use crate::memory::{Counters, Memory};
use crate::probe;
use crate::store::{function_dir_name, EntryAddress, Store};

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
    write_warned: AtomicBool,
}

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
            write_warned: AtomicBool::new(false),
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
    ) -> Option<CacheKey> {
        if mode == CallMode::Uncached || memory.store().is_none() {
            return None;
        }
        let mut hasher = ArgsHasher::new(self.identity(), self.version());
        args(&mut hasher);
        match hasher.finish() {
            Ok(key) => Some(key),
            Err(source) => {
                let function = self.identity().to_owned();
                self.problem(memory, Error::Key { function, source }, NOT_CACHED);
                None
            }
        }
    }

    /// Runs one call: serves the stored value for `key`, or runs `compute`, stores its value
    /// and returns it. Simultaneous misses on one key in this process compute once.
    pub fn call<R, P, F>(
        &self,
        memory: &Memory,
        mode: CallMode,
        key: Option<CacheKey>,
        compute: F,
    ) -> R
    where
        P: StorePolicy<R>,
        F: FnOnce() -> R,
    {
        let probing = probe::probing();
        probe::record_call();
        let (Some(key), Some(store)) = (key, memory.store()) else {
            if probing {
                probe::miss(None);
            }
            return compute();
        };
        let at = self.address(&key);
        // Whether the value may appear on disk while we wait to compute: only when nothing was
        // there (a broken entry is not rewritten by anyone but its next computer).
        let mut absent = true;
        if mode == CallMode::Cached {
            match self.lookup::<P::Stored>(memory, store, &at) {
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
                Claim::Waited(Some(payload)) => {
                    if let Some(value) = self.decode_payload(memory, store, &at, &payload) {
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
                        if let Lookup::Hit(value) = self.lookup(memory, store, &at) {
                            return P::rebuild(value);
                        }
                    }
                }
                Claim::Owner(flight) => {
                    // This thread computes the key for the process; now for all processes.
                    let mut may_be_stored = absent;
                    let lock = match store.lock(&at, memory.lock_timeout_value()) {
                        Ok(Acquired::Lock { lock, waited }) => {
                            may_be_stored |= waited;
                            Some(lock)
                        }
                        Ok(Acquired::TimedOut) => {
                            log::warn(&format!(
                                "`{}`: another process has been computing the same call for longer \
                                 than the lock timeout; computing it here too",
                                self.identity()
                            ));
                            may_be_stored = true;
                            None
                        }
                        Err(error) => {
                            self.write_problem(memory, error);
                            None
                        }
                    };
                    // Another thread or process may have stored the value meanwhile.
                    if mode == CallMode::Cached && may_be_stored {
                        if let Lookup::Hit(value) = self.lookup(memory, store, &at) {
                            drop(lock);
                            flight.finish(None);
                            return P::rebuild(value);
                        }
                    }
                    let started = Instant::now();
                    let value = compute();
                    let duration = started.elapsed();
                    Counters::bump(&memory.counters.misses);
                    let payload = match P::stored(&value) {
                        Some(stored) => self.save(memory, store, &at, stored, duration),
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

    /// Whether an intact entry for `key` is stored: present, of this format, for this key, with a
    /// matching checksum. (Its payload is not decoded: that happens on the call.)
    pub fn is_cached(&self, memory: &Memory, key: Option<CacheKey>) -> bool {
        let (Some(key), Some(store)) = (key, memory.store()) else {
            return false;
        };
        match store.read(&self.address(&key)) {
            Ok(Some(bytes)) => entry::decode(&bytes, &key).is_ok(),
            _ => false,
        }
    }

    /// Removes every stored entry of this function, all versions.
    pub fn clear(&self, memory: &Memory) -> Result<(), Error> {
        match memory.store() {
            Some(store) => store.clear_function(&self.names().dir),
            None => Ok(()),
        }
    }

    fn address<'a>(&'a self, key: &'a CacheKey) -> EntryAddress<'a> {
        EntryAddress {
            function: &self.names().dir,
            version: self.version(),
            key,
        }
    }

    fn lookup<R: DeserializeOwned>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
    ) -> Lookup<R> {
        let found = self.read_entry(memory, store, at);
        if let Lookup::Hit(_) = found {
            Counters::bump(&memory.counters.hits);
        }
        found
    }

    fn read_entry<R: DeserializeOwned>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
    ) -> Lookup<R> {
        let bytes = match store.read(at) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Lookup::Absent,
            Err(error) => {
                self.problem(memory, error, RECOMPUTING);
                return Lookup::Broken;
            }
        };
        let decoded = match entry::decode(&bytes, at.key) {
            Ok((header, payload)) => {
                let value = self.decode_payload(memory, store, at, payload);
                if value.is_some() {
                    probe::record_hit(header.duration);
                }
                value
            }
            Err(CorruptEntry::OtherVersion { found }) => {
                // Written by another version of memo: not an error, just not ours to read.
                tracing::debug!(target: "memo", found, "entry of another format version");
                None
            }
            Err(reason) => {
                let path = store.describe(at);
                self.problem(memory, Error::Corrupt { path, reason }, RECOMPUTING);
                None
            }
        };
        match decoded {
            Some(value) => Lookup::Hit(value),
            None => Lookup::Broken,
        }
    }

    fn decode_payload<R: DeserializeOwned>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
        payload: &[u8],
    ) -> Option<R> {
        match rmp_serde::from_slice(payload) {
            Ok(value) => Some(value),
            Err(error) => {
                let error = Error::Decode {
                    path: store.describe(at),
                    type_name: std::any::type_name::<R>(),
                    message: error.to_string(),
                };
                self.problem(memory, error, RECOMPUTING);
                None
            }
        }
    }

    /// Encodes and stores a computed value; returns the payload for waiting threads.
    fn save<R: Serialize>(
        &self,
        memory: &Memory,
        store: &dyn Store,
        at: &EntryAddress<'_>,
        value: &R,
        duration: std::time::Duration,
    ) -> Option<Payload> {
        let payload = match rmp_serde::to_vec_named(value) {
            Ok(payload) => payload,
            Err(error) => {
                let function = self.identity().to_owned();
                let message = error.to_string();
                self.problem(memory, Error::Encode { function, message }, NOT_CACHED);
                return None;
            }
        };
        let result = self.save_source(memory, store).and_then(|()| {
            let header = entry::encode_header(at.key, SystemTime::now(), duration, &payload);
            store.write(at, &header, &payload)
        });
        match result {
            Ok(()) => Counters::bump(&memory.counters.stores),
            Err(error) => self.write_problem(memory, error),
        }
        Some(Arc::new(payload))
    }

    fn save_source(&self, memory: &Memory, store: &dyn Store) -> Result<(), Error> {
        if memory.first_store_of(self as *const Self as usize) {
            let text = format!(
                "// memo: source of `{}`, version {}\n{}",
                self.identity(),
                self.version(),
                self.def.source
            );
            store.save_source(&self.names().dir, self.version(), &text)?;
            memory.clean_in_background(&self.names().dir, self.version());
        }
        Ok(())
    }

    /// A failed write: warned once per function (a read-only or full disk would otherwise warn on
    /// every call), then at debug level.
    fn write_problem(&self, memory: &Memory, error: Error) {
        if memory.is_strict() || !self.write_warned.swap(true, Ordering::Relaxed) {
            self.problem(memory, error, NOT_STORED);
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
const NOT_CACHED: &str = "the value is computed and returned, but not cached";
const NOT_STORED: &str = "the value is returned but not stored; further write failures of this function are logged at debug level";
