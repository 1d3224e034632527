//! Packs: entries up to the pack limit (16 KiB by default) are records appended to files shared
//! by a function version, one written by each process. These tests damage, tear, evict and
//! share packed entries; writers that must have ended run as child processes (this test binary,
//! running one `#[ignore]`d test).
#![cfg(unix)]

mod common;

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{child_test, fresh_dir, inspector, pack_files, stored_keys};
use memo::format::pack::{self, Kind, RECORD_HEADER};
use memo::gc::Limits;
use memo::prelude::*;

const DIR: &str = "MEMO_TEST_PACK_DIR";
const COUNT: &str = "MEMO_TEST_PACK_COUNT";

thread_local! {
    /// The cache of the test running on this thread (each test has its own thread).
    static CURRENT: Cell<Option<&'static Memory>> = const { Cell::new(None) };
    /// Computations on this thread.
    static COMPUTED: Cell<usize> = const { Cell::new(0) };
}

fn current() -> &'static Memory {
    CURRENT.with(|c| c.get()).expect("a test sets its cache")
}

/// A cache in `dir` for the rest of this thread, without a memory tier (every hit reads the
/// packs).
fn use_cache(dir: &Path) -> &'static Memory {
    let memory: &'static Memory = Box::leak(Box::new(Memory::new(dir).memory_tier(0)));
    CURRENT.with(|c| c.set(Some(memory)));
    memory
}

fn computed() -> usize {
    COMPUTED.with(Cell::get)
}

#[cached(memory = current())]
fn quick(x: u64) -> u64 {
    COMPUTED.with(|n| n.set(n.get() + 1));
    x * x
}

/// About a kilobyte per entry: packed (under 16 KiB).
#[cached(memory = current())]
fn sized(x: u64) -> Vec<u8> {
    COMPUTED.with(|n| n.set(n.get() + 1));
    vec![x as u8; 1000]
}

/// In a child process: the cache in the folder the parent named.
fn child_cache() -> &'static Memory {
    let dir = std::env::var_os(DIR).expect("cache folder");
    use_cache(Path::new(&dir))
}

/// In a child process: how many values the parent asked for.
fn child_count() -> u64 {
    std::env::var(COUNT).unwrap().parse().unwrap()
}

/// Not a test of its own: a writer process. Stores `quick(0..n)` then `sized(0..n)` in the
/// folder the environment names, and exits (a normal exit writes what waits in memory).
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn writer() {
    let n = child_count();
    child_cache();
    for x in 0..n {
        assert_eq!(quick(x), x * x);
    }
    for x in 0..n {
        assert_eq!(sized(x)[0], x as u8);
    }
    assert_eq!(computed(), 2 * n as usize);
}

/// Not a test of its own: stores `quick(0..n)`, then stays alive without writing anything else.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn lingering() {
    let n = child_count();
    child_cache();
    for x in 0..n {
        assert_eq!(quick(x), x * x);
    }
    std::thread::sleep(Duration::from_secs(60));
}

/// Not a test of its own: stores `quick(1)` (waiting in memory), forks, and both processes go on
/// storing into the same folder; the parent waits for the child and writes what it has.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn forking() {
    let memory = child_cache();
    assert_eq!(quick(1), 1);
    // SAFETY: the child only runs memo code and ends with `_exit`; no lock is held across the
    // fork by this thread, and the flushing thread's locks are free between its writes.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        let ok = (2..50).all(|x| quick(x) == x * x) && memory.flush().is_ok();
        // SAFETY: ends the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    for x in 100..150 {
        assert_eq!(quick(x), x * x);
    }
    let mut status = 0;
    // SAFETY: waits for the child started above.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    memory.flush().unwrap();
}

/// Not a test of its own: stores `quick(1)`, forks, and stores `quick(2)` after the fork; the
/// child only reads, and exits with 0 when it finds both stored (1 when it had to compute).
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn forked_reader() {
    let memory = child_cache();
    assert_eq!(quick(1), 1);
    memory.flush().unwrap();
    let stored = PathBuf::from(std::env::var_os(DIR).unwrap()).join("parent-stored");
    // SAFETY: as in `forking`.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        let started = Instant::now();
        while !stored.exists() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let ok = quick(1) == 1 && quick(2) == 4 && computed() == 1;
        // SAFETY: as in `forking`.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    assert_eq!(quick(2), 4);
    memory.flush().unwrap();
    std::fs::write(&stored, b"").unwrap();
    let mut status = 0;
    // SAFETY: waits for the child started above.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child computed a value its parent had stored (status {status})"
    );
}

/// Runs the `writer` child on `dir` with `n` values of each function.
fn write_in_child(dir: &Path, n: u64) {
    let output = child_test("writer")
        .env(DIR, dir)
        .env(COUNT, n.to_string())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "writer failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The one pack of `quick` in `dir`.
fn quick_pack(dir: &Path) -> PathBuf {
    let packs: Vec<PathBuf> = pack_files(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("packs.quick"))
        .collect();
    assert_eq!(packs.len(), 1, "{packs:?}");
    packs[0].clone()
}

/// Where each record of a pack starts.
fn record_offsets(pack: &Path) -> Vec<u64> {
    let mut offsets = Vec::new();
    pack::read_pack(pack, |record| offsets.push(record.offset)).unwrap();
    offsets
}

fn total_bytes(packs: &[PathBuf]) -> u64 {
    packs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_damaged_record_is_a_miss_and_verify_cuts_the_pack_before_it() {
    let dir = fresh_dir("pack-damage");
    write_in_child(&dir, 10);
    let pack = quick_pack(&dir);
    // Records 0..10 are quick(0..10), in order; damage the fifth one's entry.
    let offsets = record_offsets(&pack);
    assert_eq!(offsets.len(), 10);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[offsets[4] as usize + RECORD_HEADER + 20] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();

    let memory = use_cache(&dir);
    for x in 0..10 {
        assert_eq!(quick(x), x * x, "never a wrong value");
    }
    // The reading of that pack stops at the damage: quick(4..10) are gone.
    assert_eq!(computed(), 6);

    // 4 + 6 of quick, 10 of sized.
    let report = memory.verify().unwrap();
    assert_eq!(report.valid, 20, "{report:?}");
    assert_eq!(report.broken.len(), 1, "{report:?}");
    assert_eq!(report.broken[0].0, pack);
    assert!(report.broken[0].1.contains("checksum"), "{report:?}");
    assert_eq!(memory.remove_broken(&report).unwrap(), 1);
    // Replaced (never cut in place: a reader may have it mapped) by what came before the damage.
    assert!(!pack.exists());
    let cut: Vec<PathBuf> = pack_files(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("-r.pack"))
        .collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(std::fs::metadata(&cut[0]).unwrap().len(), offsets[4]);
    let report = memory.verify().unwrap();
    assert_eq!((report.valid, report.broken.len()), (20, 0));

    // Another reader of the folder: every value is a hit.
    use_cache(&dir);
    for x in 0..10 {
        assert_eq!(quick(x), x * x);
    }
    assert_eq!(computed(), 6);
}

#[test]
fn a_record_cut_short_at_the_end_is_no_damage() {
    let dir = fresh_dir("pack-torn");
    write_in_child(&dir, 5);
    let pack = quick_pack(&dir);
    // What a writer killed in the middle of a write leaves: the start of a record.
    let record = pack::encode(
        Kind::Entry,
        1,
        &memo::CacheKey::from_bytes([9; 32]),
        &[&[1; 200]],
        b"",
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&pack)
        .unwrap()
        .write_all(&record[..100])
        .unwrap();

    let memory = use_cache(&dir);
    for x in 0..5 {
        assert_eq!(quick(x), x * x);
        assert_eq!(sized(x)[999], x as u8);
    }
    assert_eq!(computed(), 0, "the records before the cut are all served");
    let report = memory.verify().unwrap();
    assert_eq!((report.valid, report.broken.len()), (10, 0), "{report:?}");
}

#[test]
fn caches_on_one_folder_see_each_others_records_and_a_clear() {
    let dir = fresh_dir("pack-shared");
    // Two `Memory` values on one folder know as little of each other as two processes.
    let first = use_cache(&dir);
    assert_eq!(quick(1), 1);
    first.flush().unwrap();
    let second = use_cache(&dir);
    assert_eq!(quick(1), 1);
    assert_eq!(
        computed(),
        1,
        "the second cache reads the first one's record"
    );
    assert_eq!(quick(2), 4);
    second.flush().unwrap();
    CURRENT.with(|c| c.set(Some(first)));
    assert_eq!(quick(2), 4);
    assert_eq!(computed(), 2);

    // Cleared by the first: the second does not serve what its index still had.
    first.clear().unwrap();
    CURRENT.with(|c| c.set(Some(second)));
    assert_eq!(quick(1), 1);
    assert_eq!(computed(), 3);
    second.flush().unwrap();
    // And what it stores after the clear lasts.
    CURRENT.with(|c| c.set(Some(first)));
    assert_eq!(quick(1), 1);
    assert_eq!(computed(), 3);
    assert_eq!(stored_keys(&dir).len(), 1);
}

/// Slow enough (over `LOCK_FROM`) for its misses to take the key's cross-process lock.
#[cached(memory = current())]
fn slow_one(x: u64) -> u64 {
    COMPUTED.with(|n| n.set(n.get() + 1));
    std::thread::sleep(Duration::from_micros(300));
    x + 1
}

#[test]
fn a_value_another_cache_stored_is_found_under_the_key_lock() {
    let dir = fresh_dir("pack-absent");
    let first = use_cache(&dir);
    // The folder has no packs yet; the first cache's look-ups remember that for a moment.
    assert!(!slow_one::is_cached(1));
    // Another cache on the folder (as another process would) computes and stores the value.
    use_cache(&dir);
    assert_eq!(slow_one(1), 2);
    CURRENT.with(|c| c.set(Some(first)));
    // The first cache's look-up still takes the folder for empty, but under the key's lock it
    // looks again and finds the value: computed once.
    assert_eq!(slow_one(1), 2);
    assert_eq!(computed(), 1);
}

#[test]
fn a_packed_value_is_kept_in_memory_from_its_second_read_on() {
    let dir = fresh_dir("pack-second-read");
    let writer = use_cache(&dir);
    for x in 0..10 {
        assert_eq!(quick(x), x * x);
    }
    writer.flush().unwrap();
    // A cache with a memory tier, new to the folder, as a new process is.
    let reader: &'static Memory = Box::leak(Box::new(Memory::new(&dir)));
    CURRENT.with(|c| c.set(Some(reader)));
    let hits = || (reader.stats().hits, reader.stats().memory_hits);
    for round in 1..=3 {
        for x in 0..10 {
            assert_eq!(quick(x), x * x, "round {round}");
        }
    }
    // Rounds 1 and 2 read the pack (a value read once is not worth a copy in memory), round 3
    // finds the values in memory.
    assert_eq!(hits(), (30, 10));
    assert_eq!(computed(), 10);
}

#[test]
fn clearing_one_function_keeps_what_waits_for_another() {
    let dir = fresh_dir("pack-clear-other");
    let memory = use_cache(&dir);
    assert_eq!(quick(7), 49);
    assert_eq!(sized(7)[0], 7);
    // quick(7) may still wait in memory: clearing `sized` must not drop it.
    sized::clear().unwrap();
    assert_eq!(quick(7), 49);
    assert_eq!(computed(), 2);
    memory.flush().unwrap();
    assert_eq!(stored_keys(&dir).len(), 1);
    assert_eq!(sized(7)[0], 7);
    assert_eq!(computed(), 3, "the cleared function computes again");
}

#[test]
fn a_removal_that_did_not_happen_leaves_the_folder_usable() {
    let dir = fresh_dir("pack-stuck");
    let memory = use_cache(&dir);
    assert_eq!(quick(1), 1);
    memory.flush().unwrap();
    // What a removal interrupted after its first step leaves: the counter says "removed", the
    // folder is still there.
    let pack = quick_pack(&dir);
    let generation = pack.parent().unwrap().with_file_name(".generation");
    let mut bytes = std::fs::read(&generation).unwrap();
    bytes[8..16].copy_from_slice(&1u64.to_le_bytes());
    std::fs::write(&generation, &bytes).unwrap();

    for x in 2..20 {
        assert_eq!(quick(x), x * x);
    }
    memory.flush().unwrap();
    for x in 1..20 {
        assert_eq!(quick(x), x * x);
    }
    assert_eq!(computed(), 19, "each value computed once, and kept");
    assert!(pack_files(&dir).len() <= 2, "{:?}", pack_files(&dir));
    assert_eq!(stored_keys(&dir).len(), 19);
}

#[test]
fn evicted_records_are_misses_and_their_space_is_reclaimed() {
    let dir = fresh_dir("pack-gc");
    write_in_child(&dir, 100);
    let before = total_bytes(&pack_files(&dir));
    let memory = use_cache(&dir);
    // Packed entries were last used when written: quick(0..100), then sized(0..100).
    let report = memory.reduce_size(&Limits::new().max_items(60)).unwrap();
    assert_eq!(report.evicted.len(), 140);
    assert_eq!(stored_keys(&dir).len(), 60);
    // The writer's packs, finished, were rewritten without the evicted records (40 of about a
    // kilobyte, 100 small ones; the removals take 64 bytes each in this process's pack).
    let after = total_bytes(&pack_files(&dir));
    assert!(before - after > 40_000, "{before} -> {after} bytes");
    for x in 40..100 {
        assert_eq!(sized(x)[0], x as u8);
    }
    assert_eq!(computed(), 0, "the 60 most recent entries are kept");
    assert_eq!(quick(99), 99 * 99);
    assert_eq!(sized(0)[0], 0);
    assert_eq!(computed(), 2, "evicted entries are computed again");
}

#[test]
fn the_inspector_lists_packed_entries_with_their_arguments() {
    let dir = fresh_dir("pack-inspect");
    write_in_child(&dir, 3);
    let run = |args: &[&str]| -> serde_json::Value {
        let output = Command::new(inspector())
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    assert_eq!(run(&["stats"])["entries"], 6);
    let show = run(&["show", "packs.quick"]);
    let mut previews: Vec<&str> = show["latest_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["preview"].as_str().unwrap())
        .collect();
    previews.sort_unstable();
    assert_eq!(previews, ["0", "1", "2"]);
    assert_eq!(run(&["verify"])["valid"], 6);
}

#[test]
fn a_forked_child_writes_a_pack_of_its_own() {
    let dir = fresh_dir("pack-fork");
    let output = child_test("forking").env(DIR, &dir).output().unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Parent: quick(1) and quick(100..150); child: quick(2..50). Had both written to the
    // parent's pack, their records would overlap and the reading would stop at the damage.
    let packs = pack_files(&dir);
    assert_eq!(packs.len(), 2, "{packs:?}");
    let memory = use_cache(&dir);
    let report = memory.verify().unwrap();
    assert_eq!((report.valid, report.broken.len()), (99, 0), "{report:?}");
    for x in (1..50).chain(100..150) {
        assert_eq!(quick(x), x * x);
    }
    assert_eq!(computed(), 0);
}

#[test]
fn a_forked_child_that_only_reads_sees_what_its_parent_stores() {
    let dir = fresh_dir("pack-fork-reader");
    let output = child_test("forked_reader").env(DIR, &dir).output().unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

static STRICT: std::sync::LazyLock<Memory> = std::sync::LazyLock::new(|| {
    // Strict first: the later settings build the store again, which must stay strict.
    Memory::new(fresh_dir("pack-strict"))
        .strict(true)
        .pack_limit(16 * 1024)
        .durable(false)
});

#[cached(memory = STRICT)]
fn strict_quick(x: u64) -> u64 {
    x + 1
}

#[test]
fn in_strict_mode_quick_results_are_written_before_the_call_returns() {
    for x in 0..5 {
        assert_eq!(strict_quick(x), x + 1);
        // Nothing waits in memory: a failed write must be the call's error.
        assert_eq!(
            stored_keys(STRICT.location().unwrap()).len(),
            x as usize + 1
        );
    }
}

#[test]
fn quick_results_reach_the_disk_within_milliseconds_without_an_exit() {
    let dir = fresh_dir("pack-linger");
    let mut child = child_test("lingering")
        .env(DIR, &dir)
        .env(COUNT, "50")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while stored_keys(&dir).len() < 50 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stored = stored_keys(&dir).len();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(stored, 50, "the background flush wrote them");
}
