//! Thread-local hooks that let the parallel map look a call up without computing it.
//!
//! While a probe runs on a thread, a cached call that misses does not compute: it records its
//! key and unwinds with a private payload (through [`std::panic::resume_unwind`], so no panic
//! hook runs and nothing is printed). Hits return as usual. Per-thread tallies of hits, misses
//! and the compute time that hits saved let the map report what each item did.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use crate::key::CacheKey;

thread_local! {
    static PROBING: Cell<bool> = const { Cell::new(false) };
    static MISSED: Cell<Option<CacheKey>> = const { Cell::new(None) };
    static TALLY: Cell<Tally> = const { Cell::new(Tally::ZERO) };
}

/// What the cached calls made on one thread did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Calls that reached a `#[cached]` function.
    pub calls: u64,
    /// Of those, calls answered from the cache.
    pub hits: u64,
    /// Compute time those hits saved, from the durations stored with the entries.
    pub saved: Duration,
}

impl Tally {
    const ZERO: Tally = Tally {
        calls: 0,
        hits: 0,
        saved: Duration::ZERO,
    };

    /// Whether the item was loaded from the cache: it made cached calls, and all of them hit.
    pub(crate) fn loaded(&self) -> bool {
        self.calls > 0 && self.hits == self.calls
    }

    /// What happened since `before`.
    pub(crate) fn since(self, before: Tally) -> Tally {
        Tally {
            calls: self.calls - before.calls,
            hits: self.hits - before.hits,
            saved: self.saved.saturating_sub(before.saved),
        }
    }
}

/// This thread's tally so far.
pub(crate) fn tally() -> Tally {
    TALLY.with(Cell::get)
}

pub(crate) fn record_call() {
    TALLY.with(|t| {
        let mut tally = t.get();
        tally.calls += 1;
        t.set(tally);
    });
}

pub(crate) fn record_hit(saved: Duration) {
    TALLY.with(|t| {
        let mut tally = t.get();
        tally.hits += 1;
        tally.saved = tally.saved.saturating_add(saved);
        t.set(tally);
    });
}

/// Whether a probe is running on this thread.
pub(crate) fn probing() -> bool {
    PROBING.with(Cell::get)
}

/// The unwinding payload of a probed miss.
struct ProbeMiss;

/// Ends a probed call that missed: records the key (`None` when the call could not be keyed,
/// e.g. a disabled cache) and unwinds to [`probe`].
pub(crate) fn miss(key: Option<CacheKey>) -> ! {
    MISSED.with(|m| m.set(key));
    panic::resume_unwind(Box::new(ProbeMiss))
}

/// The outcome of [`probe`].
pub(crate) enum Probe<R> {
    /// `f` returned: every cached call it made was a hit, or it made none (see the tally).
    Returned(R, Tally),
    /// A cached call missed; its key, if it had one.
    Missed(Option<CacheKey>),
    /// `f` panicked for another reason.
    Panicked(Box<dyn Any + Send>),
}

/// Runs `f` with probing on.
pub(crate) fn probe<R>(f: impl FnOnce() -> R) -> Probe<R> {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            PROBING.with(|p| p.set(self.0));
        }
    }
    let before = tally();
    let _reset = Reset(PROBING.with(|p| p.replace(true)));
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Probe::Returned(value, tally().since(before)),
        Err(payload) if payload.is::<ProbeMiss>() => Probe::Missed(MISSED.with(Cell::take)),
        Err(payload) => Probe::Panicked(payload),
    }
}
