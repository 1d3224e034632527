//! Expiry: `expire = "..."` and `validate = ...` decide whether a stored value is still served; a
//! value that is not is a miss, recomputed and overwritten.
//!
//! These tests change entries on disk behind the process's back, so their caches run without the
//! in-process memory tier (`memory_tier(0)`): every call reads the disk. `tests/fast_paths.rs`
//! covers the tier.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use common::{entry_files, fresh_dir, Counter};
use memo::prelude::*;
use memo::EntryMeta;

/// Entries in files of their own: the tests rewrite them.
static MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("expiry"))
        .memory_tier(0)
        .pack_limit(0)
});

static DAILY: Counter = Counter::new();

#[cached(memory = MEMORY, expire = "1day")]
fn daily(x: u64) -> u64 {
    DAILY.bump();
    x + 1
}

/// Rewrites an entry as if it had been computed `age` ago (a valid entry: header re-checksummed).
fn age_entry(path: &std::path::Path, age: Duration) {
    common::rewrite_entry(path, Some(SystemTime::now() - age), None);
}

#[test]
fn an_expired_entry_is_recomputed_and_overwritten() {
    assert_eq!(daily(1), 2);
    assert_eq!(daily(1), 2);
    assert_eq!(DAILY.get(), 1);

    let entry = entry_files(&daily::location().unwrap())[0].clone();
    age_entry(&entry, Duration::from_secs(23 * 3600));
    assert_eq!(daily(1), 2);
    assert_eq!(DAILY.get(), 1, "younger than a day: served");

    age_entry(&entry, Duration::from_secs(25 * 3600));
    assert!(!daily::is_cached(1), "an expired entry is not cached");
    assert_eq!(daily(1), 2);
    assert_eq!(DAILY.get(), 2, "older than a day: recomputed");
    assert_eq!(daily(1), 2);
    assert_eq!(DAILY.get(), 2, "and the fresh value is stored");
}

static ACCEPT: AtomicBool = AtomicBool::new(true);

fn accept(meta: &EntryMeta) -> bool {
    ACCEPT.load(Ordering::SeqCst) && meta.size > 0 && meta.created <= SystemTime::now()
}

static CHECKED: Counter = Counter::new();

#[cached(memory = MEMORY, validate = accept)]
fn checked(x: u64) -> u64 {
    CHECKED.bump();
    x * 2
}

#[test]
fn a_validation_callback_decides_what_is_served() {
    assert_eq!(checked(4), 8);
    assert_eq!(checked(4), 8);
    assert_eq!(CHECKED.get(), 1);
    ACCEPT.store(false, Ordering::SeqCst);
    assert_eq!(checked(4), 8);
    assert_eq!(CHECKED.get(), 2, "refused by the callback: recomputed");
    ACCEPT.store(true, Ordering::SeqCst);
    assert_eq!(checked(4), 8);
    assert_eq!(CHECKED.get(), 2);
}
