//! Reliability across processes, crashes and hostile files: nothing lost, nothing wrong.
//!
//! The test binary runs itself as child processes (`child_process` below, selected by
//! `MEMO_TEST_MODE`), all on one cache folder (`MEMO_TEST_DIR`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{append_line, child_test, count_lines, entry_files, fresh_dir, stored_keys, Counter};
use memo::prelude::*;

/// The children's cache: `MEMO_TEST_DIR`, with the lock timeout of `MEMO_TEST_LOCK_TIMEOUT_MS`.
static CHILD_MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    let dir = std::env::var_os("MEMO_TEST_DIR").expect("MEMO_TEST_DIR");
    let memory = Memory::new(dir);
    match std::env::var("MEMO_TEST_LOCK_TIMEOUT_MS") {
        Ok(ms) => memory.lock_timeout(Some(Duration::from_millis(ms.parse().unwrap()))),
        Err(_) => memory,
    }
});

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} not set")))
}

/// Appends a line to the counter file of the test (one line per event, atomic appends).
fn record(line: &str) {
    append_line(&env_path("MEMO_TEST_COUNTER"), line);
}

#[cached(memory = CHILD_MEMORY)]
fn contended(key: u64) -> u64 {
    record(&key.to_string());
    thread::sleep(Duration::from_millis(10));
    key * key + 1
}

/// Values from 160 KB to 4 MB, so that writes take long enough to be killed in the middle.
#[cached(memory = CHILD_MEMORY)]
fn payload(key: u64) -> Vec<u64> {
    let len = 20_000 + (key % 7) * 80_000;
    (0..len)
        .map(|i| i ^ key.wrapping_mul(0x9e37_79b9))
        .collect()
}

#[cached(memory = CHILD_MEMORY)]
fn held(key: u64) -> u64 {
    record("started");
    let secs: u64 = std::env::var("MEMO_TEST_HOLD_SECS").map_or(0, |s| s.parse().unwrap());
    thread::sleep(Duration::from_secs(secs));
    key
}

#[cached(memory = CHILD_MEMORY)]
fn bulky(key: u64) -> Vec<u64> {
    vec![key; 16_384]
}

/// What a child process does, by `MEMO_TEST_MODE`.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_process() {
    let mode = std::env::var("MEMO_TEST_MODE").unwrap();
    match mode.as_str() {
        "contend" => {
            let index: u64 = std::env::var("MEMO_TEST_INDEX").unwrap().parse().unwrap();
            let go = env_path("MEMO_TEST_GO");
            while !go.exists() {
                thread::sleep(Duration::from_millis(1));
            }
            // Each process starts at another key, so they meet on every key.
            for i in 0..100 {
                let key = (i + index * 13) % 100;
                assert_eq!(contended(key), key * key + 1);
            }
        }
        "writer" => {
            let start: u64 = std::env::var("MEMO_TEST_START").unwrap().parse().unwrap();
            for key in start.. {
                assert_eq!(payload(key), payload::call_uncached(key));
            }
        }
        "reader" => {
            let (mut checked, mut wrong) = (0, 0);
            for key in 0..10_000 {
                if payload::is_cached(key) {
                    checked += 1;
                    if payload(key) != payload::call_uncached(key) {
                        wrong += 1;
                    }
                }
            }
            let stats = CHILD_MEMORY.stats();
            println!("checked={checked} wrong={wrong} misses={}", stats.misses);
        }
        "hold" => {
            assert_eq!(held(7), 7);
        }
        "fsize" => {
            #[cfg(unix)]
            unsafe {
                // A disk that is full for this process: no file may grow past 4 KiB.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 4096,
                    rlim_max: 4096,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
            }
            let value = bulky(3);
            assert_eq!(value, vec![3; 16_384]);
            println!("value-ok stores={}", CHILD_MEMORY.stats().stores);
        }
        other => panic!("unknown mode {other}"),
    }
}

/// A child of the given mode on `dir`, counting into `counter`.
fn child(mode: &str, dir: &Path, counter: &Path, env: &[(&str, String)]) -> Command {
    let mut command = child_test("child_process");
    command
        .env("MEMO_TEST_MODE", mode)
        .env("MEMO_TEST_DIR", dir)
        .env("MEMO_TEST_COUNTER", counter)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

fn finish(child: Child, what: &str) -> String {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn eight_processes_on_the_same_100_keys_compute_each_key_once() {
    let work = fresh_dir("contend");
    let (dir, counter, go) = (work.join("cache"), work.join("counter"), work.join("go"));
    let children: Vec<Child> = (0..8)
        .map(|index| {
            let env = [
                ("MEMO_TEST_INDEX", index.to_string()),
                ("MEMO_TEST_GO", go.display().to_string()),
            ];
            child("contend", &dir, &counter, &env).spawn().unwrap()
        })
        .collect();
    std::fs::write(&go, b"").unwrap(); // start together
    for (index, running) in children.into_iter().enumerate() {
        finish(running, &format!("process {index}"));
    }
    let text = std::fs::read_to_string(&counter).unwrap();
    let mut computed: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    computed.sort_unstable();
    assert_eq!(
        computed,
        (0..100).collect::<Vec<_>>(),
        "every key computed exactly once by the 8 processes"
    );
    assert_eq!(stored_keys(&dir).len(), 100);
    let report = Memory::new(&dir).verify().unwrap();
    assert_eq!(
        (report.valid, report.broken.len(), report.lock_files),
        (100, 0, 0)
    );
}

/// A small deterministic generator, so that a failing sequence of kill points can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[test]
fn writers_killed_at_random_points_leave_only_valid_entries() {
    const KILLS: u64 = 60;
    let work = fresh_dir("kills");
    let (dir, counter) = (work.join("cache"), work.join("counter"));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill-point seed: {seed}");
    let mut random = XorShift(seed);
    let mut during_writes = 0;
    for kill in 0..KILLS {
        let env = [("MEMO_TEST_START", (kill * 3).to_string())];
        let before = temporary_files(&dir);
        let mut writer = child("writer", &dir, &counter, &env).spawn().unwrap();
        if kill % 2 == 0 {
            // At a random moment: computing, encoding, locking, writing or renaming.
            thread::sleep(Duration::from_millis(20 + random.next(80)));
        } else {
            // Amid a stream of writes: as soon as this writer has stored one entry (on Linux a
            // write in progress is an unnamed O_TMPFILE file, invisible until it is linked, so
            // the next write is already under way). Elsewhere, as soon as a temporary file
            // appears.
            let deadline = Instant::now() + Duration::from_secs(5);
            let stored = stored_keys(&dir).len();
            while temporary_files(&dir).is_subset(&before)
                && stored_keys(&dir).len() <= stored
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_micros(200));
            }
        }
        writer.kill().unwrap(); // SIGKILL: no destructor, no flush
        writer.wait().unwrap();
        if !temporary_files(&dir).is_subset(&before) {
            during_writes += 1;
        }
    }
    let memory = Memory::new(&dir);
    let report = memory.verify().unwrap();
    println!(
        "{KILLS} kills, {during_writes} of them during a write: {} entries, {} temporary files, \
         {} lock files left",
        report.valid, report.temporary_files, report.lock_files
    );
    assert!(
        report.broken.is_empty(),
        "broken entries: {:?}",
        report.broken
    );
    assert!(
        report.valid >= 10,
        "the writers stored entries ({})",
        report.valid
    );

    // Every stored entry reads back as the right value, and nothing stored is recomputed.
    let stdout = finish(
        child("reader", &dir, &counter, &[]).spawn().unwrap(),
        "reader",
    );
    assert!(
        stdout.contains(&format!("checked={} wrong=0 misses=0", report.valid)),
        "{stdout}"
    );

    // What the killed writers left behind is cleaned up.
    memory.clean(Duration::ZERO).unwrap();
    let after = memory.verify().unwrap();
    assert_eq!((after.temporary_files, after.lock_files), (0, 0));
    assert_eq!(after.valid, report.valid);
}

/// The temporary files in the cache folder: writes under way, or cut short.
fn temporary_files(dir: &Path) -> std::collections::HashSet<PathBuf> {
    let mut found = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            if item.file_name().to_string_lossy().starts_with(".tmp-") {
                found.insert(item.path());
            } else if item.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(item.path());
            }
        }
    }
    found
}

/// Waits until the counter file has `lines` lines.
fn wait_for_lines(counter: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_lines(counter) < lines {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {counter:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_lock_of_a_killed_process_is_taken_over_at_once() {
    let work = fresh_dir("stale-lock");
    let (dir, counter) = (work.join("cache"), work.join("counter"));
    let hold = [("MEMO_TEST_HOLD_SECS", "600".to_string())];
    let mut holder = child("hold", &dir, &counter, &hold).spawn().unwrap();
    wait_for_lines(&counter, 1); // it holds the key's lock and computes for ten minutes
    holder.kill().unwrap();
    holder.wait().unwrap();

    // The default timeout is an hour: only taking the dead holder's lock over lets this finish.
    let started = Instant::now();
    let quick = [("MEMO_TEST_HOLD_SECS", "0".to_string())];
    finish(
        child("hold", &dir, &counter, &quick).spawn().unwrap(),
        "successor",
    );
    assert_eq!(count_lines(&counter), 2, "the successor computed the key");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(Memory::new(&dir).verify().unwrap().valid, 1);
}

#[test]
fn a_waiter_computes_by_itself_after_the_lock_timeout() {
    let work = fresh_dir("lock-timeout");
    let (dir, counter) = (work.join("cache"), work.join("counter"));
    let hold = [("MEMO_TEST_HOLD_SECS", "600".to_string())];
    let mut holder = child("hold", &dir, &counter, &hold).spawn().unwrap();
    wait_for_lines(&counter, 1);
    let impatient = [
        ("MEMO_TEST_HOLD_SECS", "0".to_string()),
        ("MEMO_TEST_LOCK_TIMEOUT_MS", "300".to_string()),
    ];
    let output = finish(
        child("hold", &dir, &counter, &impatient).spawn().unwrap(),
        "waiter",
    );
    assert_eq!(count_lines(&counter), 2, "the waiter computed by itself");
    assert!(
        holder.try_wait().unwrap().is_none(),
        "while the holder still runs"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    drop(output);
}

#[cfg(unix)]
#[test]
fn a_full_disk_still_returns_the_value_and_leaves_no_partial_entry() {
    let work = fresh_dir("disk-full");
    let (dir, counter) = (work.join("cache"), work.join("counter"));
    let stdout = finish(
        child("fsize", &dir, &counter, &[]).spawn().unwrap(),
        "child",
    );
    assert!(stdout.contains("value-ok stores=0"), "{stdout}");
    let report = Memory::new(&dir).verify().unwrap();
    assert_eq!(
        (report.valid, report.broken.len(), report.temporary_files),
        (0, 0, 0),
        "no entry, no partial entry, no temporary file"
    );
}

// --- Hostile files, in this process. ---

// Without the memory tier: the files are changed behind the process's back. One memory per
// test: a verification of one must not see the other's link (the tests run at once).
static HOSTILE_LINK: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("hostile-link")).memory_tier(0));
static HOSTILE_HUGE: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("hostile-huge")).memory_tier(0));
static LINK_CALLS: Counter = Counter::new();
static HUGE_CALLS: Counter = Counter::new();

/// 20,000 values that each take 9 bytes in MessagePack: a 180 KB entry.
fn large_value(key: u64) -> Vec<u64> {
    vec![u64::MAX - key; 20_000]
}

#[cached(memory = HOSTILE_LINK)]
fn link_target(key: u64) -> Vec<u64> {
    LINK_CALLS.bump();
    large_value(key)
}

#[cached(memory = HOSTILE_HUGE)]
fn huge_claim(key: u64) -> Vec<u64> {
    HUGE_CALLS.bump();
    large_value(key)
}

/// The one entry file in a function version's folder.
fn only_entry(location: Option<PathBuf>) -> PathBuf {
    let files = entry_files(&location.unwrap());
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[cfg(unix)]
#[test]
fn a_symbolic_link_in_place_of_an_entry_is_not_followed_nor_written_through() {
    link_target(1);
    let entry = only_entry(link_target::location());
    let outside = fresh_dir("outside").join("target");
    std::fs::copy(&entry, &outside).unwrap();
    let original = std::fs::read(&outside).unwrap();
    std::fs::remove_file(&entry).unwrap();
    std::os::unix::fs::symlink(&outside, &entry).unwrap();
    assert_eq!(link_target(1), large_value(1));
    assert_eq!(LINK_CALLS.get(), 2, "the link is a miss");
    assert!(
        !std::fs::symlink_metadata(&entry)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced by a real entry"
    );
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        original,
        "the link's target is untouched"
    );
}

#[test]
fn a_header_claiming_a_huge_length_is_a_miss() {
    huge_claim(2);
    let entry = only_entry(huge_claim::location());
    let mut bytes = std::fs::read(&entry).unwrap();
    assert!(
        bytes.len() > 64 * 1024,
        "a large entry takes the header-first path"
    );
    bytes[56..64].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&entry, &bytes).unwrap();
    let report = HOSTILE_HUGE.verify().unwrap();
    assert_eq!(
        report.broken.len(),
        1,
        "verify names it: {:?}",
        report.broken
    );
    assert_eq!(huge_claim(2), large_value(2));
    assert_eq!(HUGE_CALLS.get(), 2, "a miss, recomputed");
    assert_eq!(huge_claim(2), large_value(2));
    assert_eq!(HUGE_CALLS.get(), 2, "and repaired");
}

/// Entries in files of their own: their argument previews go to the version's previews file.
static PREVIEWED: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("previewed")).pack_limit(0));

#[cached(memory = PREVIEWED)]
fn previewed(secret: String) -> usize {
    secret.len()
}

#[cfg(unix)]
#[test]
fn argument_previews_are_not_written_through_a_symbolic_link() {
    let version_dir = previewed::location().unwrap();
    std::fs::create_dir_all(&version_dir).unwrap();
    let outside = fresh_dir("outside-previews").join("target");
    std::fs::write(&outside, "").unwrap();
    std::os::unix::fs::symlink(
        &outside,
        version_dir.join(memo::format::store::PREVIEW_FILE),
    )
    .unwrap();
    assert_eq!(previewed("secret-argument".into()), 15);
    assert_eq!(previewed("secret-argument".into()), 15);
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "",
        "nothing written through the link"
    );
}

static LINKED: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("linked")).memory_tier(0));
static LINKED_CALLS: Counter = Counter::new();

#[cached(memory = LINKED)]
fn linked(key: u64) -> u64 {
    LINKED_CALLS.bump();
    key + 1
}

#[cfg(unix)]
#[test]
fn a_cache_folder_that_is_a_symbolic_link_is_not_written_through() {
    let version_dir = linked::location().unwrap();
    let outside = fresh_dir("outside-folder");
    std::fs::create_dir_all(version_dir.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &version_dir).unwrap();
    assert_eq!(linked(1), 2);
    assert_eq!(linked(1), 2);
    assert_eq!(
        LINKED_CALLS.get(),
        2,
        "nothing can be stored through the link"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
}

/// Entries in files of their own, read from disk on every call.
static REWRITTEN: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("rewritten"))
        .pack_limit(0)
        .memory_tier(0)
});
static REWRITES: Counter = Counter::new();

#[cached(memory = REWRITTEN)]
fn rewritten(x: u64) -> u64 {
    REWRITES.bump();
    x + 7
}

#[test]
fn an_entry_stored_again_after_a_verification_is_not_removed_as_broken() {
    assert_eq!(rewritten(1), 8);
    let entry = only_entry(rewritten::location());
    let mut bytes = std::fs::read(&entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();
    let report = REWRITTEN.verify().unwrap();
    assert_eq!(report.broken.len(), 1, "{report:?}");
    // Stored again meanwhile, by a program running beside the one that verified.
    assert_eq!(rewritten::recompute(1), 8);
    assert_eq!(REWRITTEN.remove_broken(&report).unwrap(), 0);
    assert_eq!(rewritten(1), 8);
    assert_eq!(REWRITES.get(), 2, "the entry stored again is still there");
}

/// Entries in files of their own, in a folder made immutable below.
#[cfg(target_os = "linux")]
static IMMUTABLE: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("immutable"))
        .pack_limit(0)
        .memory_tier(0)
});
#[cfg(target_os = "linux")]
static IMMUTABLE_CALLS: Counter = Counter::new();

#[cfg(target_os = "linux")]
#[cached(memory = IMMUTABLE)]
fn in_immutable(x: u64) -> u64 {
    IMMUTABLE_CALLS.bump();
    x * 11
}

/// A folder nobody can create or remove files in, not even root (`chattr +i`), until dropped.
/// (A test killed meanwhile leaves it so: `chattr -i` it before removing `target`.)
#[cfg(target_os = "linux")]
struct Immutable(PathBuf);

#[cfg(target_os = "linux")]
impl Immutable {
    /// `None` where the attribute cannot be set (not root, or a file system without it).
    fn set(dir: &Path) -> Option<Immutable> {
        let status = Command::new("chattr").arg("+i").arg(dir).status();
        status
            .is_ok_and(|status| status.success())
            .then(|| Immutable(dir.to_owned()))
    }
}

#[cfg(target_os = "linux")]
impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Counts memo's warnings on the thread it is the default subscriber of.
#[cfg(target_os = "linux")]
struct CountWarnings(std::sync::Arc<std::sync::atomic::AtomicUsize>);

#[cfg(target_os = "linux")]
impl tracing::Subscriber for CountWarnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::WARN && meta.target() == "memo" {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(target_os = "linux")]
#[test]
fn a_broken_entry_that_cannot_be_replaced_is_not_warned_about_at_every_call() {
    assert_eq!(in_immutable(2), 22);
    let entry = only_entry(in_immutable::location());
    let mut bytes = std::fs::read(&entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();
    let Some(_immutable) = Immutable::set(entry.parent().unwrap()) else {
        eprintln!("skipped: `chattr +i` is not possible here (needs root and ext4, xfs, btrfs...)");
        return;
    };
    let warnings = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = CountWarnings(std::sync::Arc::clone(&warnings));
    tracing::subscriber::with_default(counter, || {
        for _ in 0..3 {
            assert_eq!(in_immutable(2), 22);
        }
    });
    assert_eq!(
        IMMUTABLE_CALLS.get(),
        4,
        "the broken entry is a miss every time"
    );
    assert_eq!(
        std::fs::read(&entry).unwrap(),
        bytes,
        "it could not be replaced"
    );
    // The broken entry, then the failed write; the next calls' are logged at debug level.
    assert_eq!(warnings.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert!(IMMUTABLE.stats().errors >= 6, "each is still counted");
}
