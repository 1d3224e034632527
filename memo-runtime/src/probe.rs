//! Thread-local hooks that let the parallel map look a call up without computing it.
//!
//! While a probe runs on a thread, a cached call that misses does not compute: it records its
//! key and unwinds with a private payload (through [`std::panic::resume_unwind`], so no panic
//! hook runs and nothing is printed). Hits return as usual. Per-thread tallies of hits, misses
//! and the compute time that hits saved let the map report what each item did.
//!
//! A miss is a miss even when `f` catches its unwinding (the record stays), and a cached call
//! made while the thread unwinds (from a `Drop`) computes rather than unwinding again.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use crate::key::CacheKey;

thread_local! {
    static PROBING: Cell<bool> = const { Cell::new(false) };
    /// Set by a probed miss (with its key, if it had one), taken by the probe.
    static MISSED: Cell<Option<Option<CacheKey>>> = const { Cell::new(None) };
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

/// Whether a probe is running on this thread (and the thread is not unwinding already: a
/// second unwinding would abort the process).
pub(crate) fn probing() -> bool {
    PROBING.with(Cell::get) && !std::thread::panicking()
}

/// Runs `f` with probing off: code that computes for real, which may run on a thread that is
/// inside a probe (rayon runs other work on a thread that waits).
pub(crate) fn unprobed<R>(f: impl FnOnce() -> R) -> R {
    let _reset = Reset(PROBING.with(|p| p.replace(false)));
    f()
}

/// Puts the probing flag back as it was.
struct Reset(bool);

impl Drop for Reset {
    fn drop(&mut self) {
        PROBING.with(|p| p.set(self.0));
    }
}

/// The unwinding payload of a probed miss.
struct ProbeMiss;

/// Ends a probed call that missed: records the key (`None` when the call could not be keyed,
/// e.g. a disabled cache) and unwinds to [`probe`].
pub(crate) fn miss(key: Option<CacheKey>) -> ! {
    MISSED.with(|m| m.set(Some(key)));
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

/// Runs `f` with probing on. A miss recorded while it ran makes it a miss however `f` ended:
/// `f` may have caught the miss's unwinding (and returned something made up) or panicked after.
pub(crate) fn probe<R>(f: impl FnOnce() -> R) -> Probe<R> {
    let before = tally();
    // A probe inside another on this thread (a nested map) keeps the outer one's record aside.
    let outer = MISSED.with(Cell::take);
    let outcome = {
        let _reset = Reset(PROBING.with(|p| p.replace(true)));
        panic::catch_unwind(AssertUnwindSafe(f))
    };
    let missed = MISSED.with(|m| m.replace(outer));
    match (outcome, missed) {
        (_, Some(key)) => Probe::Missed(key),
        (Ok(value), None) => Probe::Returned(value, tally().since(before)),
        // The miss of a job that another thread ran for `f` (rayon inside `f`): its key stayed
        // on that thread.
        (Err(payload), None) if payload.is::<ProbeMiss>() => Probe::Missed(None),
        (Err(payload), None) => Probe::Panicked(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_that_f_catches_is_still_a_miss() {
        let key = CacheKey::from_bytes([7; 32]);
        let probed = probe(|| {
            let caught = panic::catch_unwind(|| miss(Some(key)));
            assert!(caught.is_err());
            5
        });
        assert!(matches!(probed, Probe::Missed(Some(k)) if k == key));
        // Nothing is left over for the next probe on this thread.
        assert!(matches!(probe(|| 6), Probe::Returned(6, _)));
    }

    #[test]
    fn code_run_unprobed_inside_a_probe_is_not_probed() {
        assert!(matches!(probe(probing), Probe::Returned(true, _)));
        assert!(matches!(
            probe(|| unprobed(probing)),
            Probe::Returned(false, _)
        ));
        assert!(!probing());
    }

    #[test]
    fn a_probe_inside_a_probe_keeps_the_outer_miss() {
        let key = CacheKey::from_bytes([8; 32]);
        let probed = probe(|| {
            let _ = panic::catch_unwind(|| miss(Some(key)));
            assert!(matches!(probe(|| 1), Probe::Returned(1, _)));
            2
        });
        assert!(matches!(probed, Probe::Missed(Some(k)) if k == key));
    }
}
