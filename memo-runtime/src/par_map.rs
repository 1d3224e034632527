//! The parallel cached map: `.par_cached_map(f)` on iterators and slices.
//!
//! `f` is a `#[cached]` function, or a closure that calls one (to pass extra arguments). The map
//! caches nothing itself: every result is stored by the cached function as soon as its item
//! finishes, so a run that is killed part way loses nothing it finished, and the rerun computes
//! only what is missing. A closure can not be cached by itself (its source cannot be hashed), so a
//! closure that calls no `#[cached]` function runs in parallel, uncached, with a warning.
//!
//! How a map runs:
//! 1. **Look-up.** Every item is looked up first, in parallel: `f(item)` runs with a thread-local
//!    probe on, under which a cached call that misses does not compute but records its key and
//!    returns early. Hits are served right away and never wait behind computations. When the
//!    first 64 items looked up all missed (a new run), the rest are not looked up but computed
//!    directly (those stored meanwhile are still hits, served in the computing step).
//! 2. **Compute.** Only the misses are computed, in parallel, once per distinct key: items whose
//!    key is already being computed run afterwards, when they are hits (or, when not looked up,
//!    wait for the computation of their key).
//! 3. **Failures.** A panic in one item does not stop the others: they all finish (and are
//!    stored), then [`CachedMap::try_collect`] returns a [`MapError`] naming the failed items with
//!    their inputs, and [`CachedMap::collect`] panics with that report.
//!
//! Code of `f` that runs before its cached call runs once more for a missed item that was looked
//! up (once in the look-up, once in the computation); keep such code cheap and free of side
//! effects. `f` must not be an `extern "C"` function (the look-up returns early by unwinding).
//! Because of that unwinding: a `std::sync::Mutex` guard that `f` holds across a cached call that
//! misses is dropped while unwinding, which poisons the mutex (take the guard after the call, or
//! use a lock that does not poison); `f` catching panics is fine (the miss is still seen); a map
//! inside `f` is looked up with it (an item whose inner map misses is computed later, inner map
//! and all).
//! While an item is looked up, rayon may run other work on the same thread (when `f` itself uses
//! rayon and waits): a map's computations are protected from the look-up, but plain rayon code
//! of the program that calls a `#[cached]` function and runs at the same time on the same pool
//! may see its call end with a panic; run such code outside the map's pool (`CachedMap::jobs`
//! gives the map a pool of its own).
//!
//! # Sharding
//!
//! The N jobs of a job array (Slurm `--array`, a Kubernetes indexed job, CI shards) that share one
//! cache can split the misses between them: with a [`Shard`] (from [`CachedMap::shard`], or the
//! [`MEMO_SHARD`] environment variable, e.g. `MEMO_SHARD=3/16`), a map computes only the misses
//! that belong to its shard and leaves the others to the other jobs. Hits are served as usual.
//! A missed item belongs to shard `i` of `n` when the first 8 bytes of its cache key (the key of
//! the first cached call it made that missed), read as a little-endian `u64`, are `i - 1` modulo
//! `n`: the split does not depend on the order of the items, and equal items land in one shard.
//! So the first cached call of `f` should be the item's own (do shared set-up, such as loading a
//! data set, before the map, or cache it first in one job): items whose first missed call is
//! shared all land in one shard. Items without a key (`f` calls no cached function, or the cache
//! is off) can share nothing: every shard computes them. After its share, a shard looks the other
//! items up again: what the other shards stored meanwhile is a hit, so the shard that finishes
//! last has every result; an item that fails there is left to its own shard to report. Once
//! every shard is done, a run without a shard (or with [`CachedMap::no_shard`]) gathers the
//! results, all hits, and computes whatever is still missing (a shard that failed or never ran).
//!
//! [`MEMO_SHARD`] applies to every map of the process, nested ones and those of libraries
//! included; a map that must be complete inside a job takes [`CachedMap::no_shard`]. In a
//! pipeline of maps, a stage's shards end with an error until the stage is complete, so each
//! stage is its own job array, followed by its gather step.

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::io::IsTerminal;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::key::CacheKey;
use crate::log;
use crate::probe::{self, Probe, Tally};

/// The environment variable that gives every `.par_cached_map(f)` of a process a default
/// [`Shard`]: `INDEX/COUNT`, numbered from 1, e.g. `MEMO_SHARD=3/16` for the 3rd of 16 shards.
/// Unset or empty, maps run unsharded. An invalid value makes every map that reads it fail with
/// an error that names it ([`MapError::shard_error`]). [`CachedMap::shard`] and
/// [`CachedMap::no_shard`] override it.
pub const MEMO_SHARD: &str = "MEMO_SHARD";

/// One of the `count` jobs that share the misses of a map: the `index`-th of `count`, numbered
/// from 1 (see [sharding](self#sharding)).
///
/// ```
/// use memo_runtime::par_map::Shard;
///
/// let shard = Shard::new(3, 16).unwrap();
/// assert_eq!((shard.index(), shard.count()), (3, 16));
/// assert_eq!(shard.to_string(), "3/16");
/// assert_eq!(" 3/16 ".parse::<Shard>(), Ok(shard));
/// assert!(Shard::new(0, 16).is_err(), "shards are numbered from 1");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    /// The `index`-th of `count` shards: `index` must be 1 to `count`.
    pub fn new(index: usize, count: usize) -> Result<Shard, ShardError> {
        if count == 0 {
            Err(ShardError::NoShards { index })
        } else if index == 0 || index > count {
            Err(ShardError::OutOfRange { index, count })
        } else {
            Ok(Shard { index, count })
        }
    }

    /// Which shard this is, from 1 to [`count`](Shard::count).
    pub fn index(self) -> usize {
        self.index
    }

    /// How many shards there are.
    pub fn count(self) -> usize {
        self.count
    }

    /// The shard that [`MEMO_SHARD`] names: `None` when it is unset or empty, an error
    /// ([`ShardError::Env`]) when it is not a valid `INDEX/COUNT`.
    pub fn from_env() -> Result<Option<Shard>, ShardError> {
        let Some(value) = std::env::var_os(MEMO_SHARD) else {
            return Ok(None);
        };
        let invalid = |value: String, error: ShardError| ShardError::Env {
            value,
            error: Box::new(error),
        };
        let Some(text) = value.to_str() else {
            let text = value.to_string_lossy().into_owned();
            let error = ShardError::Malformed {
                text: text.clone(),
                problem: "not valid UTF-8",
            };
            return Err(invalid(text, error));
        };
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|error| invalid(text.to_owned(), error))
    }

    /// Whether an item whose look-up missed with `key` is this shard's to compute. An item
    /// without a key (its `f` calls no cached function, or the cache is off) is every shard's:
    /// nothing of it can be shared, so each shard computes it.
    fn owns(self, key: Option<&CacheKey>) -> bool {
        let Some(key) = key else {
            return true;
        };
        let mut first = [0; 8];
        first.copy_from_slice(&key.as_bytes()[..8]);
        u64::from_le_bytes(first) % self.count as u64 == self.index as u64 - 1
    }
}

impl fmt::Display for Shard {
    /// `INDEX/COUNT`, as [`MEMO_SHARD`] takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    /// Parses `INDEX/COUNT` (`3/16`), whitespace around either number allowed.
    fn from_str(text: &str) -> Result<Shard, ShardError> {
        let malformed = |problem| ShardError::Malformed {
            text: text.to_owned(),
            problem,
        };
        let Some((index, count)) = text.split_once('/') else {
            return Err(malformed("no '/'"));
        };
        let number = |part: &str, missing, invalid| {
            let part = part.trim();
            if part.is_empty() {
                Err(malformed(missing))
            } else {
                part.parse::<usize>().map_err(|_| malformed(invalid))
            }
        };
        let index = number(index, "INDEX is missing", "INDEX is not a whole number")?;
        let count = number(count, "COUNT is missing", "COUNT is not a whole number")?;
        Shard::new(index, count)
    }
}

/// Why a [`Shard`] is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardError {
    /// The count is 0: there must be at least one shard.
    NoShards {
        /// The index given.
        index: usize,
    },
    /// The index is 0 or greater than the count: shards are numbered from 1 to the count.
    OutOfRange {
        /// The index given.
        index: usize,
        /// The count given.
        count: usize,
    },
    /// The text is not `INDEX/COUNT` with two whole numbers.
    Malformed {
        /// The text given.
        text: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// [`MEMO_SHARD`] holds an invalid value.
    Env {
        /// The variable's value.
        value: String,
        /// What is wrong with it.
        error: Box<ShardError>,
    },
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardError::NoShards { index } => {
                write!(
                    f,
                    "shard {index}/0: the number of shards must be at least 1"
                )
            }
            ShardError::OutOfRange { index, count } => {
                write!(f, "shard {index}/{count}: shards are numbered 1 to {count}")?;
                if *index == 0 {
                    f.write_str(" (add 1 to a 0-based index)")?;
                }
                Ok(())
            }
            ShardError::Malformed { text, problem } => write!(
                f,
                "{text:?} is not a shard ({problem}): expected INDEX/COUNT, e.g. 3/16 for the \
                 3rd of 16 shards"
            ),
            ShardError::Env { value, error } => {
                write!(f, "invalid {MEMO_SHARD}={value:?}: {error}")
            }
        }
    }
}

impl std::error::Error for ShardError {}

/// `.par_cached_map(f)` on any iterator: consumes it and maps its items in parallel.
///
/// ```
/// use memo_runtime::par_map::ParCachedMap;
///
/// let squares: Vec<u64> = (0..8u64).par_cached_map(|x| x * x).progress(false).collect();
/// assert_eq!(squares, [0, 1, 4, 9, 16, 25, 36, 49]);
/// ```
pub trait ParCachedMap: Iterator + Sized {
    /// Maps `f` over the items in parallel; see the [module documentation](self).
    fn par_cached_map<R, F>(self, f: F) -> CachedMap<Self::Item, F, R>
    where
        F: Fn(Self::Item) -> R + Sync,
        Self::Item: Clone + Send + Sync,
        R: Send,
    {
        CachedMap::new(self.collect(), f)
    }
}

impl<I: Iterator> ParCachedMap for I {}

/// `.par_cached_map(f)` on slices, arrays and `Vec`s: borrows them and passes `f` a clone of each
/// item (iterate with `.iter()` to pass references instead).
///
/// ```
/// use memo_runtime::par_map::ParCachedMapSlice;
///
/// let problems = vec![1u64, 2, 3];
/// let doubled: Vec<u64> = problems.par_cached_map(|x| 2 * x).progress(false).collect();
/// assert_eq!((problems.len(), doubled), (3, vec![2, 4, 6]));
/// ```
pub trait ParCachedMapSlice<T> {
    /// Maps `f` over clones of the items in parallel; see the [module documentation](self).
    fn par_cached_map<R, F>(&self, f: F) -> CachedMap<T, F, R>
    where
        F: Fn(T) -> R + Sync,
        T: Clone + Send + Sync,
        R: Send;
}

impl<T: Clone> ParCachedMapSlice<T> for [T] {
    fn par_cached_map<R, F>(&self, f: F) -> CachedMap<T, F, R>
    where
        F: Fn(T) -> R + Sync,
        T: Clone + Send + Sync,
        R: Send,
    {
        CachedMap::new(self.to_vec(), f)
    }
}

/// A parallel cached map, ready to run: set options, then collect.
///
/// Nothing runs until [`collect`](CachedMap::collect), [`try_collect`](CachedMap::try_collect),
/// [`run`](CachedMap::run) or iteration.
#[must_use = "a map does nothing until it is collected"]
pub struct CachedMap<T, F, R> {
    items: Vec<T>,
    f: F,
    jobs: Option<usize>,
    progress: Option<bool>,
    summary: bool,
    shard: ShardSetting,
    output: PhantomData<fn() -> R>,
}

/// Which shard a map computes.
#[derive(Debug, Clone, Copy)]
enum ShardSetting {
    /// The one [`MEMO_SHARD`] names, if any (the default).
    FromEnv,
    /// This one.
    Fixed(Shard),
    /// None: every miss is computed.
    Off,
}

/// What a finished map did, from [`CachedMap::run`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MapOutcome<R> {
    /// The results, in input order: all of them (a map that is not complete, under a
    /// [`Shard`], is a [`MapError`]).
    pub results: Vec<R>,
    /// Items answered from the cache.
    pub from_cache: usize,
    /// Items computed.
    pub computed: usize,
    /// The shard the map ran as, if any.
    pub shard: Option<Shard>,
    /// Wall time of the whole map.
    pub elapsed: Duration,
    /// Compute time the cached items would have taken, from the durations stored with them.
    pub saved: Duration,
}

/// One item whose computation panicked.
#[derive(Debug, Clone)]
pub struct ItemFailure<T> {
    /// Its position in the input.
    pub index: usize,
    /// The item.
    pub input: T,
    /// The panic message.
    pub message: String,
}

/// A map without a complete result: some items failed (every other item finished, and its
/// result is stored), or, under a [`Shard`], items of other shards are not cached yet, or
/// [`MEMO_SHARD`] is invalid.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MapError<T, R> {
    /// The failed items, in input order.
    pub failures: Vec<ItemFailure<T>>,
    /// The results, in input order; `None` for the failed items and the items left to other
    /// shards.
    pub partial: Vec<Option<R>>,
    /// The positions, in input order, of the items that missed and belong to other shards: not
    /// computed here, and still not cached at the end of the map. Empty without a shard.
    pub left_to_other_shards: Vec<usize>,
    /// The shard the map ran as, if any.
    pub shard: Option<Shard>,
    /// Items answered from the cache.
    pub from_cache: usize,
    /// Items computed (the failed ones not counted).
    pub computed: usize,
    /// Why [`MEMO_SHARD`] is invalid, if it is; see [`MapError::shard_error`]. (Boxed: a rare
    /// case, kept out of the size of every `Result` that carries a `MapError`.)
    shard_error: Option<Box<ShardError>>,
}

impl<T, R> MapError<T, R> {
    /// Why [`MEMO_SHARD`] is invalid, when that is the error: then nothing was looked up or
    /// computed, and every `partial` entry is `None`.
    pub fn shard_error(&self) -> Option<&ShardError> {
        self.shard_error.as_deref()
    }

    /// Whether this shard's share is done: no item failed, and the only results missing belong
    /// to other shards. A job of a job array can then exit successfully.
    pub fn awaits_other_shards(&self) -> bool {
        self.failures.is_empty()
            && self.shard_error.is_none()
            && !self.left_to_other_shards.is_empty()
    }
}

impl<T, R> fmt::Display for MapError<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(error) = &self.shard_error {
            return write!(f, "{error}; no item was looked up or computed");
        }
        if let Some(shard) = self.shard {
            write!(f, "shard {shard}: ")?;
        }
        let elsewhere = self.left_to_other_shards.len();
        if !self.failures.is_empty() {
            write!(
                f,
                "{} of {} items failed (every other item {}finished and is cached):",
                self.failures.len(),
                self.partial.len(),
                if elsewhere > 0 { "of this shard " } else { "" }
            )?;
            for failure in self.failures.iter().take(10) {
                write!(f, "\n  item {}: {}", failure.index, failure.message)?;
            }
            if self.failures.len() > 10 {
                write!(f, "\n  and {} more", self.failures.len() - 10)?;
            }
            if elsewhere == 0 {
                return Ok(());
            }
            f.write_str("\nbesides, ")?;
        }
        write!(
            f,
            "{elsewhere} of {} items belong to other shards and are not cached yet; run without a \
             shard (or .no_shard()) once all shards are done to gather the results",
            self.partial.len()
        )
    }
}

impl<T: fmt::Debug, R: fmt::Debug> std::error::Error for MapError<T, R> {}

/// Where the items run.
enum Pool {
    /// The rayon pool this call runs in: the global one, or one the caller installed.
    Current,
    /// A pool of its own, for an explicit thread count.
    Own(rayon::ThreadPool),
    /// One at a time, on the calling thread.
    Sequential,
}

impl Pool {
    fn new(jobs: Option<usize>) -> Self {
        match jobs {
            None | Some(0) => Pool::Current,
            Some(1) => Pool::Sequential,
            Some(n) => match rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("memo-map-{i}"))
                .build()
            {
                Ok(pool) => Pool::Own(pool),
                Err(error) => {
                    log::warn(&format!(
                        "par_cached_map: cannot start {n} threads ({error}); using the current pool"
                    ));
                    Pool::Current
                }
            },
        }
    }

    /// Maps `work` over `indices`, in parallel unless sequential; results in input order. Each
    /// item is a task of its own when `one_by_one` (items that compute: the threads stay busy to
    /// the end), else items go in runs that rayon splits as threads fall idle (look-ups, which
    /// take a fraction of a microsecond from memory: a task each would cost more than they do).
    fn map<U: Send>(
        &self,
        indices: &[usize],
        one_by_one: bool,
        work: impl Fn(usize) -> U + Sync,
    ) -> Vec<U> {
        let max_len = if one_by_one { 1 } else { usize::MAX };
        match self {
            Pool::Sequential => indices.iter().map(|&i| work(i)).collect(),
            Pool::Current => indices
                .par_iter()
                .with_max_len(max_len)
                .map(|&i| work(i))
                .collect(),
            Pool::Own(pool) => pool.install(|| {
                indices
                    .par_iter()
                    .with_max_len(max_len)
                    .map(|&i| work(i))
                    .collect()
            }),
        }
    }
}

/// How many items that made no cached call (while none made one) a map looks up before it stops
/// looking up, not under a shard: `f` then calls no cached function, and the other items are
/// computed at once.
const UNCACHED_AFTER: usize = 8;

/// How many items a map looks up, all of them misses, before it computes the others without
/// looking them up first (not under a shard or inside another map's look-up): the look-up pass
/// serves hits before computations, which there are none of to serve, and a missed look-up costs
/// an unwinding (several microseconds) and a second run of the code of `f` before its cached
/// call. The items computed directly are still hits if they were stored.
const ALL_MISSING_AFTER: usize = 64;

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panicked with a non-string payload".to_owned()
    }
}

/// What happened to one item.
enum Step<R> {
    Done(R, Tally),
    /// Missed in the look-up; to be computed.
    Pending(Option<CacheKey>),
    /// Missed in the look-up, and belongs to another shard.
    Elsewhere,
    Failed(String),
}

/// A finished map, before [`CachedMap::run`] or [`CachedMap::try_collect`] shapes it.
struct Finished<T, R> {
    /// In input order; `None` for failed items and items left to other shards.
    results: Vec<Option<R>>,
    failures: Vec<ItemFailure<T>>,
    elsewhere: Vec<usize>,
    shard: Option<Shard>,
    from_cache: usize,
    computed: usize,
    elapsed: Duration,
    saved: Duration,
}

impl<T, R> Finished<T, R> {
    fn error(self) -> MapError<T, R> {
        MapError {
            failures: self.failures,
            partial: self.results,
            left_to_other_shards: self.elsewhere,
            shard: self.shard,
            from_cache: self.from_cache,
            computed: self.computed,
            shard_error: None,
        }
    }
}

impl<T, F, R> CachedMap<T, F, R>
where
    F: Fn(T) -> R + Sync,
    T: Clone + Send + Sync,
    R: Send,
{
    fn new(items: Vec<T>, f: F) -> Self {
        CachedMap {
            items,
            f,
            jobs: None,
            progress: None,
            summary: false,
            shard: ShardSetting::FromEnv,
            output: PhantomData,
        }
    }

    /// How many threads compute, like joblib's `n_jobs`: by default (or `0`) the current rayon
    /// pool (all cores, unless you configured or installed another pool); `1` runs the items one
    /// after the other on the calling thread; any other number starts a pool of that many
    /// threads for this map, more than the cores included (for items that sleep or wait on I/O).
    /// The global rayon pool is never reconfigured.
    pub fn jobs(mut self, jobs: usize) -> Self {
        self.jobs = Some(jobs);
        self
    }

    /// Shows (`true`) or hides (`false`) the progress bar. By default it is shown when standard
    /// error is a terminal.
    pub fn progress(mut self, show: bool) -> Self {
        self.progress = Some(show);
        self
    }

    /// Prints a one-line summary on standard error at the end: items loaded from the cache,
    /// computed, the time spent and the compute time the cache saved. Off by default.
    pub fn summary(mut self, show: bool) -> Self {
        self.summary = show;
        self
    }

    /// Computes only the misses that belong to `shard`, one of the jobs of a job array that share
    /// one cache, instead of the shard [`MEMO_SHARD`] names (see [sharding](self#sharding)). Hits
    /// are served as usual; the misses of other shards are not computed.
    ///
    /// When every item has a result at the end (the other shards had finished), the map returns
    /// them all, as without a shard. Otherwise [`run`](CachedMap::run) and
    /// [`try_collect`](CachedMap::try_collect) return a [`MapError`] that
    /// [`awaits_other_shards`](MapError::awaits_other_shards), with this shard's counts, and
    /// [`collect`](CachedMap::collect) panics with it. Once every shard is done, a run without a
    /// shard gathers the results.
    ///
    /// ```
    /// use memo_runtime::par_map::{ParCachedMap, Shard};
    ///
    /// // The job of a job array that computes the 2nd of 4 shares of the misses. `f` would call
    /// // a `#[cached]` function; this closure caches nothing, so every shard computes every item.
    /// let shard = Shard::new(2, 4).unwrap();
    /// match (0..100u64).par_cached_map(|x| x * x).shard(shard).try_collect() {
    ///     Ok(results) => assert_eq!(results.len(), 100), // complete
    ///     Err(error) if error.awaits_other_shards() => {
    ///         // This job's share is computed and cached; a later run gathers the rest.
    ///         println!("{} computed here; {error}", error.computed);
    ///     }
    ///     Err(error) => panic!("{error}"),
    /// }
    /// ```
    pub fn shard(mut self, shard: Shard) -> Self {
        self.shard = ShardSetting::Fixed(shard);
        self
    }

    /// Runs unsharded whatever [`MEMO_SHARD`] says: every miss is computed. For the step that
    /// gathers the results of a job array inside the program that ran a shard.
    pub fn no_shard(mut self) -> Self {
        self.shard = ShardSetting::Off;
        self
    }

    fn progress_bar(&self) -> ProgressBar {
        let show = self
            .progress
            .unwrap_or_else(|| std::io::stderr().is_terminal());
        if !show {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(
            Some(self.items.len() as u64),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} {msg} {per_sec} ETA {eta} ",
        ) {
            bar.set_style(style);
        }
        bar
    }

    /// Runs the map and reports what it did; see the [module documentation](self). A map that
    /// does not have every result is a [`MapError`]: items failed, or under a [`Shard`], items
    /// of other shards are not cached yet ([`MapError::awaits_other_shards`]).
    pub fn run(self) -> Result<MapOutcome<R>, MapError<T, R>> {
        let finished = self.execute()?;
        if !finished.failures.is_empty() || !finished.elsewhere.is_empty() {
            return Err(finished.error());
        }
        Ok(MapOutcome {
            results: finished.results.into_iter().flatten().collect(),
            from_cache: finished.from_cache,
            computed: finished.computed,
            shard: finished.shard,
            elapsed: finished.elapsed,
            saved: finished.saved,
        })
    }

    /// Runs the map; the results in input order, or a [`MapError`]: the failed items, or under a
    /// [`Shard`], the items left to other shards that are not cached yet.
    pub fn try_collect(self) -> Result<Vec<R>, MapError<T, R>> {
        let finished = self.execute()?;
        if !finished.failures.is_empty() || !finished.elsewhere.is_empty() {
            return Err(finished.error());
        }
        Ok(finished.results.into_iter().flatten().collect())
    }

    /// Runs the map and collects the results in input order. If items panicked, panics after
    /// every other item finished (and was stored), with a report of the failed items. Under a
    /// [`Shard`], also panics (after computing its share) when items of other shards are not
    /// cached yet; use [`try_collect`](CachedMap::try_collect) to handle that case.
    pub fn collect<C: FromIterator<R>>(self) -> C {
        match self.try_collect() {
            Ok(results) => results.into_iter().collect(),
            Err(error) => panic!("par_cached_map: {error}"),
        }
    }

    /// The shard to compute: the one set, or the one [`MEMO_SHARD`] names.
    fn resolve_shard(&self) -> Result<Option<Shard>, ShardError> {
        match self.shard {
            ShardSetting::FromEnv => Shard::from_env(),
            ShardSetting::Fixed(shard) => Ok(Some(shard)),
            ShardSetting::Off => Ok(None),
        }
    }

    /// Runs the map.
    fn execute(self) -> Result<Finished<T, R>, MapError<T, R>> {
        let started = Instant::now();
        let shard = match self.resolve_shard() {
            Ok(shard) => shard,
            Err(error) => {
                if self.summary {
                    eprintln!("memo: {error}; no item was looked up or computed");
                }
                return Err(MapError {
                    failures: Vec::new(),
                    partial: std::iter::repeat_with(|| None)
                        .take(self.items.len())
                        .collect(),
                    left_to_other_shards: Vec::new(),
                    shard: None,
                    from_cache: 0,
                    computed: 0,
                    shard_error: Some(Box::new(error)),
                });
            }
        };
        let bar = self.progress_bar();
        let pool = Pool::new(self.jobs);
        let CachedMap {
            items, f, summary, ..
        } = self;
        // Live counts for the bar only: the outcome's counts are taken from the steps at the end,
        // so a map without a bar touches no shared counter per item.
        let shown = !bar.is_hidden();
        let from_cache = AtomicUsize::new(0);
        let computed = AtomicUsize::new(0);
        let update = |tally: &Tally| {
            if !shown {
                return;
            }
            if tally.loaded() {
                from_cache.fetch_add(1, Ordering::Relaxed);
            } else {
                computed.fetch_add(1, Ordering::Relaxed);
            }
            bar.inc(1);
            bar.set_message(format!(
                "{} cached, {} computed",
                from_cache.load(Ordering::Relaxed),
                computed.load(Ordering::Relaxed)
            ));
        };

        // 1. Look every item up; stop looking up once `f` turns out to call no cached function,
        //    or once the first items all missed (not under a shard, where each item's key
        //    decides whose it is, so every item is looked up; nor inside another map's look-up,
        //    which needs the key of an item's first miss).
        let uncached = AtomicBool::new(false);
        let (without_calls, with_calls) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let may_stop = shard.is_none() && !probe::probing();
        let (missed, any_hit) = (AtomicUsize::new(0), AtomicBool::new(!may_stop));
        let all_missing = AtomicBool::new(false);
        let all: Vec<usize> = (0..items.len()).collect();
        let mut steps: Vec<Step<R>> = pool.map(&all, false, |i| {
            if (shard.is_none() && uncached.load(Ordering::Relaxed))
                || all_missing.load(Ordering::Relaxed)
            {
                return Step::Pending(None);
            }
            let step = match probe::probe(|| f(items[i].clone())) {
                Probe::Returned(value, tally) => {
                    // Judged on several items: `f` may call a cached function for some inputs
                    // only, or on other threads (rayon inside `f`), which this one does not see.
                    // Once an item made a cached call the question is settled: the counts are
                    // not written again (threads would pass their line back and forth per item).
                    if with_calls.load(Ordering::Relaxed) == 0 {
                        if tally.calls > 0 {
                            with_calls.fetch_add(1, Ordering::Relaxed);
                        } else if without_calls.fetch_add(1, Ordering::Relaxed) + 1
                            >= UNCACHED_AFTER
                            && with_calls.load(Ordering::Relaxed) == 0
                        {
                            uncached.store(true, Ordering::Relaxed);
                        }
                    }
                    Step::Done(value, tally)
                }
                Probe::Missed(key) => {
                    // Counted until a hit is seen (then the counter is not written again).
                    if !any_hit.load(Ordering::Relaxed)
                        && missed.fetch_add(1, Ordering::Relaxed) + 1 >= ALL_MISSING_AFTER
                        && !any_hit.load(Ordering::Relaxed)
                    {
                        all_missing.store(true, Ordering::Relaxed);
                    }
                    return Step::Pending(key);
                }
                Probe::Panicked(payload) => Step::Failed(panic_message(&*payload)),
            };
            if let Step::Done(_, tally) = &step {
                if tally.hits > 0 && !any_hit.load(Ordering::Relaxed) {
                    any_hit.store(true, Ordering::Relaxed);
                }
                update(tally);
            }
            step
        });

        // A map inside an item of another map being looked up (a nested map) is itself a look-up:
        // unless all its items were hits, that item is a miss, computed later for real.
        if probe::probing() {
            if let Some(missed) = steps.iter().find(|step| !matches!(step, Step::Done(..))) {
                probe::miss(match missed {
                    Step::Pending(key) => *key,
                    _ => None,
                });
            }
        }

        // Under a shard, the misses of other shards are left to them.
        let mut elsewhere = Vec::new();
        if let Some(shard) = shard {
            for (i, step) in steps.iter_mut().enumerate() {
                if let Step::Pending(key) = *step {
                    if !shard.owns(key.as_ref()) {
                        *step = Step::Elsewhere;
                        elsewhere.push(i);
                    }
                }
            }
            bar.dec_length(elsewhere.len() as u64);
        }

        // 2. Compute the misses: one item per key first, then the items that share a key (hits
        //    by then, unless the first one failed).
        let mut seen = HashSet::new();
        let (mut first, mut then) = (Vec::new(), Vec::new());
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Pending(Some(key)) if !seen.insert(*key) => then.push(i),
                Step::Pending(_) => first.push(i),
                _ => {}
            }
        }
        for round in [first, then] {
            let outcomes = pool.map(&round, true, |i| {
                let before = probe::tally();
                // Not probed, even on a thread that waits inside another map's probe.
                let computed = || probe::unprobed(|| f(items[i].clone()));
                match panic::catch_unwind(AssertUnwindSafe(computed)) {
                    Ok(value) => {
                        let tally = probe::tally().since(before);
                        update(&tally);
                        Step::Done(value, tally)
                    }
                    Err(payload) => {
                        bar.inc(1);
                        Step::Failed(panic_message(&*payload))
                    }
                }
            });
            for (i, outcome) in round.into_iter().zip(outcomes) {
                steps[i] = outcome;
            }
        }

        // 3. Under a shard, look the items of other shards up again: those the other shards
        //    stored meanwhile are hits now.
        let again: Vec<usize> = elsewhere
            .iter()
            .copied()
            .filter(|&i| matches!(steps[i], Step::Elsewhere))
            .collect();
        if !again.is_empty() {
            let outcomes = pool.map(&again, false, |i| {
                match probe::probe(|| f(items[i].clone())) {
                    Probe::Returned(value, tally) => {
                        bar.inc_length(1);
                        update(&tally);
                        Some(Step::Done(value, tally))
                    }
                    // Still missing; or failing, which its own shard reports.
                    Probe::Missed(_) | Probe::Panicked(_) => None,
                }
            });
            for (i, outcome) in again.into_iter().zip(outcomes) {
                if let Some(step) = outcome {
                    steps[i] = step;
                }
            }
            elsewhere.retain(|&i| matches!(steps[i], Step::Elsewhere));
        }
        bar.finish_and_clear();

        let (mut saved, mut from_cache, mut computed) = (Duration::ZERO, 0, 0);
        let mut calls = 0;
        let mut results = Vec::with_capacity(steps.len());
        let mut failures = Vec::new();
        for (index, step) in steps.into_iter().enumerate() {
            match step {
                Step::Done(value, tally) => {
                    saved = saved.saturating_add(tally.saved);
                    calls += tally.calls;
                    if tally.loaded() {
                        from_cache += 1;
                    } else {
                        computed += 1;
                    }
                    results.push(Some(value));
                }
                Step::Failed(message) => {
                    let input = items[index].clone();
                    failures.push(ItemFailure {
                        index,
                        input,
                        message,
                    });
                    results.push(None);
                }
                Step::Elsewhere => results.push(None),
                Step::Pending(_) => unreachable!("every pending item is computed in step 2"),
            }
        }
        if from_cache + computed > 0 && calls == 0 {
            log::warn(
                "par_cached_map: the mapped function made no #[cached] call on the map's threads, \
                 so nothing seems cached (calls it makes on threads of its own, e.g. through rayon \
                 inside it or a nested map with jobs of its own, are not seen); the items were \
                 computed in parallel",
            );
        }
        let finished = Finished {
            results,
            failures,
            elsewhere,
            shard,
            from_cache,
            computed,
            elapsed: started.elapsed(),
            saved,
        };
        if summary {
            eprintln!("{}", finished.summary());
        }
        Ok(finished)
    }
}

impl<T, R> Finished<T, R> {
    /// The closing line of [`CachedMap::summary`].
    fn summary(&self) -> String {
        let mut line = String::from("memo: ");
        if let Some(shard) = self.shard {
            line += &format!("shard {shard}: ");
        }
        line += &format!(
            "{} items: {} loaded from cache, {} computed",
            self.results.len(),
            self.from_cache,
            self.computed
        );
        if !self.failures.is_empty() {
            line += &format!(", {} failed", self.failures.len());
        }
        if !self.elsewhere.is_empty() {
            line += &format!(", {} left to other shards", self.elsewhere.len());
        }
        line += &format!(
            " in {:.2?} (compute time saved: {:.2?})",
            self.elapsed, self.saved
        );
        line
    }
}

impl<T, F, R> IntoIterator for CachedMap<T, F, R>
where
    F: Fn(T) -> R + Sync,
    T: Clone + Send + Sync,
    R: Send,
{
    type Item = R;
    type IntoIter = std::vec::IntoIter<R>;

    /// Runs the map (as [`CachedMap::collect`]) and iterates over the results, e.g. to reduce
    /// them: `problems.par_cached_map(g).into_iter().sum::<u64>()`.
    fn into_iter(self) -> Self::IntoIter {
        self.collect::<Vec<R>>().into_iter()
    }
}

impl<T, F, R> IntoParallelIterator for CachedMap<T, F, R>
where
    F: Fn(T) -> R + Sync,
    T: Clone + Send + Sync,
    R: Send,
{
    type Item = R;
    type Iter = rayon::vec::IntoIter<R>;

    /// Runs the map (as [`CachedMap::collect`]) and returns the results as a rayon parallel
    /// iterator, e.g. for a parallel `reduce`.
    fn into_par_iter(self) -> Self::Iter {
        self.collect::<Vec<R>>().into_par_iter()
    }
}
