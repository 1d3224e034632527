//! Behaviour of `#[cached]` inside one process: values of many types, the handle, threads,
//! panics, recursion, and a cache that is damaged or cannot be written.
//!
//! These tests change entries on disk behind the process's back, so their caches run without the
//! in-process memory tier (`memory_tier(0)`): every call reads the disk. `tests/fast_paths.rs`
//! covers the tier.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Barrier, LazyLock};
use std::thread;
use std::time::Duration;

use common::{entry_files, fresh_dir, Counter};
use memo::prelude::*;
use serde::{Deserialize, Serialize};

static MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("cached")).memory_tier(0));
/// Every entry in a file of its own, for the tests that damage entry files (tests/packs.rs
/// damages packed ones).
static FILES: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("cached-files"))
        .memory_tier(0)
        .pack_limit(0)
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sample {
    name: String,
    values: Vec<f64>,
    label: Option<(u8, char)>,
}

static DESCRIBE: Counter = Counter::new();

/// Borrowed arguments of several shapes, a struct result.
#[cached(memory = MEMORY)]
fn describe(name: &str, values: &[f64], sample: &Sample, pair: (u32, String)) -> Sample {
    DESCRIBE.bump();
    Sample {
        name: format!("{name}/{}/{}", sample.name, pair.1),
        values: values.iter().map(|v| v * f64::from(pair.0)).collect(),
        label: sample.label,
    }
}

#[test]
fn borrowed_and_compound_arguments_and_results_round_trip() {
    let sample = Sample {
        name: "s".into(),
        values: vec![],
        label: Some((7, 'λ')),
    };
    let values = vec![1.5, -0.0, 3.25];
    let first = describe("n", &values, &sample, (2, "p".into()));
    let expected = Sample {
        name: "n/s/p".into(),
        values: vec![3.0, -0.0, 6.5],
        label: Some((7, 'λ')),
    };
    assert_eq!(first, expected);
    assert_eq!(DESCRIBE.get(), 1);
    let second = describe("n", &values, &sample, (2, "p".into()));
    assert_eq!(second, expected);
    assert_eq!(DESCRIBE.get(), 1, "the second call must be served");
    // Any argument that differs is another entry.
    describe("n", &values, &sample, (3, "p".into()));
    describe("m", &values, &sample, (2, "p".into()));
    describe("n", &values[1..], &sample, (2, "p".into()));
    assert_eq!(DESCRIBE.get(), 4);
}

static OPTIONAL: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn optional(items: Vec<String>, limit: Option<usize>) -> Option<Vec<String>> {
    OPTIONAL.bump();
    limit.map(|n| items.into_iter().take(n).collect())
}

#[test]
fn vec_string_and_option_arguments_and_results() {
    let items = vec!["a".to_string(), "b".into(), "c".into()];
    assert_eq!(optional(items.clone(), None), None);
    assert_eq!(optional(items.clone(), None), None);
    assert_eq!(
        optional(items.clone(), Some(2)),
        Some(vec!["a".into(), "b".into()])
    );
    assert_eq!(
        optional(items.clone(), Some(2)),
        Some(vec!["a".into(), "b".into()])
    );
    assert_eq!(OPTIONAL.get(), 2);
}

static COUNT_WORDS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn count_words(counts: HashMap<String, u32>) -> u32 {
    COUNT_WORDS.bump();
    counts.values().sum()
}

#[test]
fn a_hash_map_argument_is_keyed_whatever_its_order() {
    let a: HashMap<String, u32> = (0..200).map(|i| (format!("w{i}"), i)).collect();
    let mut b: HashMap<String, u32> = HashMap::with_capacity(1024);
    b.extend((0..200).rev().map(|i| (format!("w{i}"), i)));
    assert_eq!(count_words(a), 19900);
    assert_eq!(count_words(b), 19900);
    assert_eq!(COUNT_WORDS.get(), 1);
}

static HANDLED: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn handled(x: u64) -> u64 {
    HANDLED.bump();
    x + 1000
}

#[test]
fn the_handle_checks_bypasses_refreshes_and_clears() {
    assert!(!handled::is_cached(1));
    assert_eq!(handled::call_uncached(1), 1001);
    assert!(!handled::is_cached(1), "call_uncached stores nothing");
    assert_eq!(HANDLED.get(), 1);

    assert_eq!(handled(1), 1001);
    assert!(handled::is_cached(1));
    assert_eq!(HANDLED.get(), 2);
    assert_eq!(handled::recompute(1), 1001);
    assert_eq!(HANDLED.get(), 3, "recompute always computes");
    assert_eq!(handled(1), 1001);
    assert_eq!(HANDLED.get(), 3);

    let location = handled::location().expect("enabled cache");
    assert!(location.join("source.rs").is_file());
    let source = std::fs::read_to_string(location.join("source.rs")).unwrap();
    assert!(source.contains("fn handled(x: u64) -> u64"), "{source}");
    assert!(source.contains(handled::version()), "{source}");
    assert_eq!(handled::version().len(), 64);

    handled::clear().unwrap();
    assert!(!handled::is_cached(1));
    assert!(entry_files(&location).is_empty());
    assert_eq!(handled(1), 1001);
    assert_eq!(HANDLED.get(), 4);
    // The folder made anew has the source of its entries again.
    assert!(
        location.join("source.rs").is_file(),
        "source recorded after the clear"
    );
}

static SLOW: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn slow_square(x: u64) -> u64 {
    SLOW.bump();
    thread::sleep(Duration::from_millis(300));
    x * x
}

#[test]
fn eight_threads_missing_on_one_key_compute_it_once() {
    let barrier = Barrier::new(8);
    let results: Vec<u64> = thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    slow_square(12)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![144; 8]);
    assert_eq!(SLOW.get(), 1);
}

static FLAKY: Counter = Counter::new();

/// Panics on its first run only.
#[cached(memory = MEMORY)]
fn flaky(x: u64) -> u64 {
    FLAKY.bump();
    if FLAKY.get() == 1 {
        thread::sleep(Duration::from_millis(200));
        panic!("first run fails");
    }
    x * 3
}

#[test]
fn a_panic_stores_nothing_and_releases_waiters() {
    thread::scope(|scope| {
        let first = scope.spawn(|| flaky(5));
        thread::sleep(Duration::from_millis(50));
        // Waits for the first call, sees it fail, and computes itself.
        let second = scope.spawn(|| flaky(5));
        assert!(first.join().is_err(), "the panic reaches its caller");
        assert_eq!(second.join().unwrap(), 15);
    });
    assert_eq!(FLAKY.get(), 2);
    assert_eq!(flaky(5), 15);
    assert_eq!(FLAKY.get(), 2);
}

static FIB: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn fib(n: u32) -> u128 {
    FIB.bump();
    if n < 2 {
        u128::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

#[test]
fn recursive_functions_compute_each_value_once() {
    assert_eq!(fib(100), 354_224_848_179_261_915_075);
    assert_eq!(FIB.get(), 101);
    assert_eq!(fib(100), 354_224_848_179_261_915_075);
    assert_eq!(FIB.get(), 101);
}

static SELF_CALLS: Counter = Counter::new();

/// Calls itself once with the same arguments: must not wait for itself.
#[cached(memory = MEMORY)]
fn reenters(x: u64) -> u64 {
    SELF_CALLS.bump();
    if SELF_CALLS.get() == 1 {
        reenters(x) + 1
    } else {
        x
    }
}

#[test]
fn a_call_with_its_own_key_inside_itself_does_not_deadlock() {
    assert_eq!(reenters(10), 11);
    assert_eq!(SELF_CALLS.get(), 2);
}

static LEFT_ASKS: AtomicBool = AtomicBool::new(true);
static RIGHT_ASKS: AtomicBool = AtomicBool::new(true);
static BOTH_INSIDE: Barrier = Barrier::new(2);

/// On its first run, once `right` runs too, asks `right` for the same argument.
#[cached(memory = MEMORY)]
fn left(x: u64) -> u64 {
    if LEFT_ASKS.swap(false, Ordering::SeqCst) {
        BOTH_INSIDE.wait();
        right(x) + 1
    } else {
        x
    }
}

/// `left` the other way round.
#[cached(memory = MEMORY)]
fn right(x: u64) -> u64 {
    if RIGHT_ASKS.swap(false, Ordering::SeqCst) {
        BOTH_INSIDE.wait();
        left(x) + 10
    } else {
        x
    }
}

/// As when a work-stealing pool runs, inside one computation, another item's call: two
/// threads each computing a key and asking for the other's. The second to ask computes the
/// key itself instead of waiting (for ever).
#[test]
fn two_threads_asking_for_each_others_keys_do_not_deadlock() {
    let (ended, end) = mpsc::channel();
    for ask in [left as fn(u64) -> u64, right] {
        let ended = ended.clone();
        thread::spawn(move || ended.send(ask(7)).unwrap());
    }
    let mut both: Vec<u64> = (0..2)
        .map(|_| {
            end.recv_timeout(Duration::from_secs(30))
                .expect("two threads asking for each other's keys deadlocked")
        })
        .collect();
    both.sort_unstable();
    // One of them computed the other's key directly (7) and added to it; the other took that.
    assert!(
        both == [7 + 10, 7 + 10 + 1] || both == [7 + 1, 7 + 1 + 10],
        "{both:?}"
    );
}

static DAMAGED: Counter = Counter::new();

#[cached(memory = FILES)]
fn damaged(x: u64) -> Vec<u64> {
    DAMAGED.bump();
    (0..x).collect()
}

/// The single entry file of `damaged(x)`, after making sure it is stored.
fn damaged_entry(x: u64) -> std::path::PathBuf {
    damaged::clear().unwrap();
    let _ = damaged(x);
    let files = entry_files(&damaged::location().unwrap());
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

/// Something done to an entry file.
type Damage = Box<dyn Fn(&std::path::Path)>;

#[test]
fn a_damaged_entry_is_a_miss_and_is_repaired() {
    let expected: Vec<u64> = (0..40).collect();
    let damages: Vec<(&str, Damage)> = vec![
        (
            "truncated",
            Box::new(|p| {
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() - 3]).unwrap();
            }),
        ),
        (
            "byte flipped in the payload",
            Box::new(|p| {
                let mut bytes = std::fs::read(p).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(p, bytes).unwrap();
            }),
        ),
        (
            "byte flipped in the header",
            Box::new(|p| {
                let mut bytes = std::fs::read(p).unwrap();
                bytes[45] ^= 0x80;
                std::fs::write(p, bytes).unwrap();
            }),
        ),
        (
            "garbage",
            Box::new(|p| std::fs::write(p, b"not an entry at all, just text").unwrap()),
        ),
        ("empty", Box::new(|p| std::fs::write(p, b"").unwrap())),
        (
            "a folder instead of a file",
            Box::new(|p| {
                std::fs::remove_file(p).unwrap();
                std::fs::create_dir(p).unwrap();
            }),
        ),
    ];
    for (what, damage) in damages {
        let entry = damaged_entry(40);
        let before = DAMAGED.get();
        damage(&entry);
        assert_eq!(damaged(40), expected, "{what}: wrong value");
        assert_eq!(DAMAGED.get(), before + 1, "{what}: must be recomputed");
        if entry.is_file() {
            // Repaired: the next call is a hit again.
            assert_eq!(damaged(40), expected, "{what}");
            assert_eq!(DAMAGED.get(), before + 1, "{what}: must be repaired");
        } else {
            std::fs::remove_dir(&entry).unwrap();
        }
    }
}

static RETYPED: Counter = Counter::new();

#[cached(memory = FILES)]
fn retyped(x: u64) -> Sample {
    RETYPED.bump();
    Sample {
        name: x.to_string(),
        values: vec![x as f64],
        label: None,
    }
}

#[test]
fn a_valid_entry_that_does_not_decode_as_the_return_type_is_a_miss() {
    let expected = retyped(9);
    let files = entry_files(&retyped::location().unwrap());
    let entry = files.last().unwrap();
    // A well-formed entry with a correct checksum whose payload is another type, as after a
    // change to the return type's definition.
    #[derive(Serialize)]
    struct Other {
        title: String,
    }
    let payload = rmp_serde::to_vec_named(&Other { title: "x".into() }).unwrap();
    common::rewrite_entry(entry, None, Some(&payload));
    assert!(memo::format::entry::decode_header(&std::fs::read(entry).unwrap()).is_ok());

    let before = RETYPED.get();
    assert_eq!(retyped(9), expected);
    assert_eq!(RETYPED.get(), before + 1);
}

static UNWRITABLE: LazyLock<Memory> = LazyLock::new(|| {
    // A folder below a regular file cannot be created, even by root.
    let dir = fresh_dir("unwritable");
    std::fs::write(dir.join("file"), b"").unwrap();
    Memory::new(dir.join("file").join("cache"))
});

static UNWRITABLE_CALLS: Counter = Counter::new();

#[cached(memory = UNWRITABLE)]
fn unwritable(x: u64) -> u64 {
    UNWRITABLE_CALLS.bump();
    x * 2
}

#[test]
fn a_cache_that_cannot_be_written_still_returns_values() {
    assert_eq!(unwritable(4), 8);
    assert_eq!(unwritable(4), 8);
    assert_eq!(
        UNWRITABLE_CALLS.get(),
        2,
        "nothing can be stored, so both compute"
    );
    assert!(UNWRITABLE.stats().errors >= 2);
    assert_eq!(UNWRITABLE.stats().stores, 0);
}

#[cfg(unix)]
static READ_ONLY: LazyLock<Memory> = LazyLock::new(|| {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_dir("read-only");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    Memory::new(dir.join("cache"))
});

#[cfg(unix)]
#[cached(memory = READ_ONLY)]
fn read_only(x: u64) -> u64 {
    x * 5
}

#[cfg(unix)]
#[test]
fn a_read_only_cache_folder_still_returns_values() {
    // As root the folder is writable anyway; the value must be right either way.
    assert_eq!(read_only(3), 15);
    assert_eq!(read_only(3), 15);
    assert_eq!(read_only(4), 20);
}

static STRICT: LazyLock<Memory> = LazyLock::new(|| {
    let dir = fresh_dir("strict");
    std::fs::write(dir.join("file"), b"").unwrap();
    Memory::new(dir.join("file").join("cache")).strict(true)
});

#[cached(memory = STRICT)]
fn strict(x: u64) -> u64 {
    x
}

#[test]
fn strict_mode_turns_a_write_failure_into_a_panic_naming_the_path() {
    let error = std::panic::catch_unwind(|| strict(1)).unwrap_err();
    let message = error.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("strict mode"), "{message}");
    assert!(message.contains("file/cache"), "{message}");
}

struct NotEncodable(u64);

impl Serialize for NotEncodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to serialize"))
    }
}

impl<'de> Deserialize<'de> for NotEncodable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(NotEncodable)
    }
}

static ENCODE_FAILS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn encode_fails(x: u64) -> NotEncodable {
    ENCODE_FAILS.bump();
    NotEncodable(x)
}

static KEY_FAILS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn key_fails(x: NotEncodable) -> u64 {
    KEY_FAILS.bump();
    x.0
}

#[test]
fn values_and_arguments_that_fail_to_serialize_are_computed_not_cached() {
    assert_eq!(encode_fails(3).0, 3);
    assert_eq!(encode_fails(3).0, 3);
    assert_eq!(ENCODE_FAILS.get(), 2);
    assert_eq!(key_fails(NotEncodable(4)), 4);
    assert_eq!(key_fails(NotEncodable(4)), 4);
    assert_eq!(KEY_FAILS.get(), 2);
}

static NEW_ROOT: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("markers").join("new-root")));

#[cached(memory = NEW_ROOT)]
fn in_new_root(x: u8) -> u8 {
    x
}

#[test]
fn a_new_cache_root_is_marked_for_git_and_backup_tools() {
    assert_eq!(in_new_root(1), 1);
    let root = NEW_ROOT.location().unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join(".gitignore")).unwrap(),
        "*\n"
    );
    let tag = std::fs::read_to_string(root.join("CACHEDIR.TAG")).unwrap();
    assert!(tag.starts_with("Signature: 8a477f597d28d172789f06886806bc55"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("v1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "cache folders are private: {mode:o}");
    }
}

static EXISTING: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("existing")));

#[cached(memory = EXISTING)]
fn in_existing(x: u8) -> u8 {
    x
}

#[test]
fn an_existing_folder_is_not_given_a_gitignore() {
    assert_eq!(in_existing(2), 2);
    let root = EXISTING.location().unwrap();
    assert!(
        !root.join(".gitignore").exists(),
        "the user's folder is left alone"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("v1").join(".gitignore")).unwrap(),
        "*\n"
    );
}
