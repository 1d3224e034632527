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
//!    returns early. Hits are served right away and never wait behind computations.
//! 2. **Compute.** Only the misses are computed, in parallel, once per distinct key: items whose
//!    key is already being computed run afterwards, when they are hits.
//! 3. **Failures.** A panic in one item does not stop the others: they all finish (and are
//!    stored), then [`CachedMap::try_collect`] returns a [`MapError`] naming the failed items with
//!    their inputs, and [`CachedMap::collect`] panics with that report.
//!
//! Code of `f` that runs before its cached call runs once more for a missed item (once in the
//! look-up, once in the computation); keep such code cheap and free of side effects. `f` must not
//! be an `extern "C"` function (the look-up returns early by unwinding).

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::io::IsTerminal;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::log;
use crate::probe::{self, Probe, Tally};

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
    output: PhantomData<fn() -> R>,
}

/// What a finished map did, from [`CachedMap::run`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MapOutcome<R> {
    /// The results, in input order.
    pub results: Vec<R>,
    /// Items answered from the cache.
    pub from_cache: usize,
    /// Items computed.
    pub computed: usize,
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

/// Some items failed; every other item finished, and its result is stored.
#[derive(Debug, Clone)]
pub struct MapError<T, R> {
    /// The failed items, in input order.
    pub failures: Vec<ItemFailure<T>>,
    /// The results, in input order; `None` for the failed items.
    pub partial: Vec<Option<R>>,
}

impl<T, R> fmt::Display for MapError<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} items failed (every other item finished and is cached):",
            self.failures.len(),
            self.partial.len()
        )?;
        for failure in self.failures.iter().take(10) {
            write!(f, "\n  item {}: {}", failure.index, failure.message)?;
        }
        if self.failures.len() > 10 {
            write!(f, "\n  and {} more", self.failures.len() - 10)?;
        }
        Ok(())
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

    /// Maps `work` over `indices`, in parallel unless sequential; results in input order.
    fn map<U: Send>(&self, indices: &[usize], work: impl Fn(usize) -> U + Sync) -> Vec<U> {
        match self {
            Pool::Sequential => indices.iter().map(|&i| work(i)).collect(),
            Pool::Current => indices
                .par_iter()
                .with_max_len(1)
                .map(|&i| work(i))
                .collect(),
            Pool::Own(pool) => pool.install(|| {
                indices
                    .par_iter()
                    .with_max_len(1)
                    .map(|&i| work(i))
                    .collect()
            }),
        }
    }
}

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
    Pending(Option<crate::key::CacheKey>),
    Failed(String),
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

    /// Runs the map and reports what it did; see the [module documentation](self).
    pub fn run(self) -> Result<MapOutcome<R>, MapError<T, R>> {
        let started = Instant::now();
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

        // 1. Look every item up; stop probing once `f` turns out to call no cached function.
        let uncached = AtomicBool::new(false);
        let all: Vec<usize> = (0..items.len()).collect();
        let mut steps: Vec<Step<R>> = pool.map(&all, |i| {
            if uncached.load(Ordering::Relaxed) {
                return Step::Pending(None);
            }
            let step = match probe::probe(|| f(items[i].clone())) {
                Probe::Returned(value, tally) => {
                    if tally.calls == 0 && !uncached.swap(true, Ordering::Relaxed) {
                        log::warn(
                            "par_cached_map: the mapped function calls no #[cached] function, so \
                             nothing is cached; items are computed in parallel",
                        );
                    }
                    Step::Done(value, tally)
                }
                Probe::Missed(key) => return Step::Pending(key),
                Probe::Panicked(payload) => Step::Failed(panic_message(&*payload)),
            };
            if let Step::Done(_, tally) = &step {
                update(tally);
            }
            step
        });

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
            let outcomes = pool.map(&round, |i| {
                let before = probe::tally();
                match panic::catch_unwind(AssertUnwindSafe(|| f(items[i].clone()))) {
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
        bar.finish_and_clear();

        let (mut saved, mut from_cache, mut computed) = (Duration::ZERO, 0, 0);
        let mut results = Vec::with_capacity(steps.len());
        let mut failures = Vec::new();
        for (index, step) in steps.into_iter().enumerate() {
            match step {
                Step::Done(value, tally) => {
                    saved = saved.saturating_add(tally.saved);
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
                Step::Pending(_) => unreachable!("every pending item is computed in step 2"),
            }
        }
        let outcome = MapOutcome {
            results: Vec::new(),
            from_cache,
            computed,
            elapsed: started.elapsed(),
            saved,
        };
        if summary {
            eprintln!(
                "memo: {} items: {} loaded from cache, {} computed{} in {:.2?} (compute time saved: {:.2?})",
                results.len(),
                outcome.from_cache,
                outcome.computed,
                if failures.is_empty() {
                    String::new()
                } else {
                    format!(", {} failed", failures.len())
                },
                outcome.elapsed,
                outcome.saved
            );
        }
        if !failures.is_empty() {
            return Err(MapError {
                failures,
                partial: results,
            });
        }
        Ok(MapOutcome {
            results: results.into_iter().flatten().collect(),
            ..outcome
        })
    }

    /// Runs the map; the results in input order, or the failed items.
    pub fn try_collect(self) -> Result<Vec<R>, MapError<T, R>> {
        self.run().map(|outcome| outcome.results)
    }

    /// Runs the map and collects the results in input order. If items panicked, panics after
    /// every other item finished (and was stored), with a report of the failed items.
    pub fn collect<C: FromIterator<R>>(self) -> C {
        match self.try_collect() {
            Ok(results) => results.into_iter().collect(),
            Err(error) => panic!("par_cached_map: {error}"),
        }
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
