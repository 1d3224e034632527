//! Size control: each limit of `Memory::reduce_size`, least recently used first, recently used
//! entries surviving, dry runs, version pruning (never a protected version), the eviction log,
//! and the automatic byte limit.
//!
//! These tests change entries on disk behind the process's back, so their caches run without the
//! in-process memory tier (`memory_tier(0)`): every call reads the disk. `tests/fast_paths.rs`
//! covers the tier.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{entry_files, fresh_dir, set_last_used};
use memo::gc::{Limits, Reason};
use memo::prelude::*;

/// One cache per test: the tests run at once.
fn memory(name: &str) -> &'static Memory {
    static MEMORIES: LazyLock<Mutex<HashMap<String, &'static Memory>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    MEMORIES
        .lock()
        .unwrap()
        .entry(name.to_owned())
        // Entries in files of their own: the tests set their times of last use (tests/packs.rs
        // evicts packed ones).
        .or_insert_with(|| {
            let memory = Memory::new(fresh_dir(name)).memory_tier(0).pack_limit(0);
            Box::leak(Box::new(memory))
        })
}

thread_local! {
    static CURRENT: std::cell::Cell<Option<&'static Memory>> = const { std::cell::Cell::new(None) };
}

fn current() -> &'static Memory {
    CURRENT.with(|c| c.get()).expect("a test sets its cache")
}

thread_local! {
    /// Computations of `item` on this thread: each test runs on its own thread, in its own cache.
    static ITEM: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// 2,000 bytes of payload per entry, in the test's own cache.
#[cached(memory = current())]
fn item(x: u64) -> Vec<u8> {
    ITEM.with(|n| n.set(n.get() + 1));
    vec![x as u8; 2_000]
}

/// Stores `item(0..10)` in a fresh cache named `name`; entry `x` was last used `10 - x` hours ago.
fn setup(name: &str) -> (&'static Memory, Vec<PathBuf>) {
    let memory = memory(name);
    CURRENT.with(|c| c.set(Some(memory)));
    let mut paths = Vec::new();
    for x in 0..10u64 {
        let before = entry_files(memory.location().unwrap());
        item(x);
        let after = entry_files(memory.location().unwrap());
        let new: Vec<PathBuf> = after.into_iter().filter(|p| !before.contains(p)).collect();
        assert_eq!(new.len(), 1);
        set_last_used(
            &new[0],
            SystemTime::now() - Duration::from_secs(3600 * (10 - x)),
        );
        paths.push(new[0].clone());
    }
    (memory, paths)
}

fn surviving(paths: &[PathBuf]) -> Vec<usize> {
    (0..paths.len()).filter(|&x| paths[x].exists()).collect()
}

#[test]
fn max_age_evicts_entries_unused_for_longer() {
    let (memory, paths) = setup("gc-age");
    let report = memory
        .reduce_size(&Limits::new().max_age(Duration::from_secs(5 * 3600 + 1800)))
        .unwrap();
    assert_eq!(surviving(&paths), [5, 6, 7, 8, 9]);
    assert_eq!(report.evicted.len(), 5);
    assert!(report.evicted.iter().all(|e| e.reason == Reason::Age));
    assert_eq!(report.kept_entries, 5);
}

#[test]
fn max_items_keeps_the_most_recently_used_and_a_hit_counts_as_use() {
    let (memory, paths) = setup("gc-items");
    assert_eq!(item(2), vec![2; 2_000]); // a hit: entry 2 is now the most recently used
    let report = memory.reduce_size(&Limits::new().max_items(3)).unwrap();
    assert_eq!(surviving(&paths), [2, 8, 9]);
    assert!(report.evicted.iter().all(|e| e.reason == Reason::Items));
}

#[test]
fn max_bytes_evicts_least_recently_used_first_and_evicted_entries_are_recomputed() {
    let (memory, paths) = setup("gc-bytes");
    let size = std::fs::metadata(&paths[0]).unwrap().len();
    let report = memory
        .reduce_size(&Limits::new().max_bytes(4 * size))
        .unwrap();
    assert_eq!(surviving(&paths), [6, 7, 8, 9]);
    assert_eq!(report.kept_bytes, 4 * size);
    let before = ITEM.with(std::cell::Cell::get);
    assert_eq!(item(0), vec![0; 2_000]);
    assert_eq!(
        ITEM.with(std::cell::Cell::get),
        before + 1,
        "an evicted entry is a miss"
    );

    let log = std::fs::read_to_string(memory.location().unwrap().join("v1/evictions.log")).unwrap();
    assert_eq!(log.lines().count(), 6);
    assert!(
        log.lines().all(|l| l.split('\t').nth(1) == Some("bytes")),
        "{log}"
    );
}

#[test]
fn a_dry_run_lists_and_keeps_everything() {
    let (memory, paths) = setup("gc-dry");
    let report = memory
        .reduce_size(&Limits::new().max_items(1).dry_run(true))
        .unwrap();
    assert_eq!(report.evicted.len(), 9);
    assert!(report.dry_run);
    assert_eq!(surviving(&paths).len(), 10);
    assert!(!memory.location().unwrap().join("v1/evictions.log").exists());
}

#[test]
fn keep_versions_prunes_old_versions_but_never_a_protected_one() {
    let (memory, _) = setup("gc-versions");
    let old = add_week_old_version("0123456789abcdef");
    let current = item::location().unwrap();
    let function = memory.functions().unwrap()[0].name.clone();
    assert_eq!(memory.functions().unwrap()[0].versions.len(), 2);

    let protected = Limits::new()
        .keep_versions(1)
        .protect(function.clone(), "0123456789abcdef");
    assert!(memory.reduce_size(&protected).unwrap().evicted.is_empty());
    assert!(old.exists(), "a protected version is never pruned");

    let report = memory.reduce_size(&Limits::new().keep_versions(1)).unwrap();
    assert_eq!(report.evicted.len(), 10);
    assert!(report
        .evicted
        .iter()
        .all(|e| e.reason == Reason::OldVersion));
    assert!(
        !old.exists(),
        "the old version's folder is gone, source and all"
    );
    assert!(current.join("source.rs").exists());
    assert_eq!(memory.functions().unwrap()[0].versions.len(), 1);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

static LIMITED: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("gc-limit")).bytes_limit(Some(300_000)));

#[cached(memory = LIMITED)]
fn big(x: u64) -> Vec<u64> {
    vec![u64::MAX - x; 12_500] // about 112 KB stored
}

#[test]
fn a_byte_limit_is_enforced_by_itself() {
    for x in 0..12 {
        big(x); // about 1.3 MB in all: past the 1 MiB check interval
    }
    // The check runs in the background once 1 MiB was stored (after the tenth value).
    let log_path = LIMITED.location().unwrap().join("v1/evictions.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The log is written after the evictions, in one write.
    while std::fs::metadata(&log_path).map_or(0, |m| m.len()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the size limit was never enforced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().all(|l| l.contains("\tbytes\t")), "{log}");
    assert!(!big::is_cached(0), "the least recently used went first");
    assert!(big::is_cached(11), "the newest stays");
    // Between two checks the cache may grow by one check interval past the limit.
    let bytes: u64 = LIMITED.functions().unwrap().iter().map(|f| f.bytes()).sum();
    assert!(bytes <= 300_000 + (1 << 20), "{bytes} bytes");
}

/// Adds an older version of `item` beside the current one: a copy of its folder named `name`,
/// last used a week ago. Returns its folder.
fn add_week_old_version(name: &str) -> PathBuf {
    let current = item::location().unwrap();
    let old = current.with_file_name(name);
    copy_dir(&current, &old);
    let week_ago = SystemTime::now() - Duration::from_secs(7 * 86_400);
    for path in entry_files(&old) {
        set_last_used(&path, week_ago);
    }
    old
}

#[test]
fn versions_are_pruned_by_age_and_with_a_count_only_past_both() {
    let (memory, _) = setup("gc-version-age");
    let old = add_week_old_version("fedcba9876543210");
    let both = Limits::new()
        .keep_versions(1)
        .max_version_age(Duration::from_secs(30 * 86_400));
    assert!(memory.reduce_size(&both).unwrap().evicted.is_empty());
    assert!(old.exists(), "past the count but used within 30 days: kept");

    let report = memory
        .reduce_size(&Limits::new().max_version_age(Duration::from_secs(3 * 86_400)))
        .unwrap();
    assert_eq!(report.evicted.len(), 10);
    assert!(!old.exists(), "unused for a week: pruned");
    assert!(
        item::location().unwrap().exists(),
        "the current version stays"
    );
}

#[test]
fn clear_stale_keeps_only_the_current_version() {
    let (memory, paths) = setup("gc-clear-stale");
    let old = add_week_old_version("fedcba9876543210");
    item::clear_stale().unwrap();
    assert!(!old.exists());
    assert!(
        paths.iter().all(|p| p.exists()),
        "the current version is untouched"
    );
    assert_eq!(memory.functions().unwrap()[0].versions.len(), 1);
}
