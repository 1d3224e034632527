//! The fast paths: the in-process memory tier in front of the disk, and slices of numbers keyed
//! as raw bytes. Each test has its own functions and cache, so counts are exact.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, LazyLock};

use common::{entry_files, fresh_dir, scheme_key, stored_keys, Counter};
use memo::prelude::*;
use memo::EntryMeta;
use serde::{Deserialize, Deserializer, Serialize};

static TIERED: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("tiered")));
/// Its own memory: the test counts its hits.
static SQUARE_MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("square")));

static SQUARES: Counter = Counter::new();

#[cached(memory = SQUARE_MEMORY)]
fn square(x: u64) -> u64 {
    SQUARES.bump();
    x * x
}

#[test]
fn a_repeated_call_is_served_from_memory_and_never_confuses_arguments() {
    let before = SQUARE_MEMORY.stats();
    for x in 0..500 {
        assert_eq!(square(x), x * x);
    }
    for round in 0..3 {
        for x in (0..500).rev() {
            assert_eq!(square(x), x * x, "round {round}");
        }
    }
    assert_eq!(SQUARES.get(), 500);
    let after = SQUARE_MEMORY.stats();
    assert_eq!(after.memory_hits - before.memory_hits, 1500);
    // Quick results reach the disk together, within milliseconds; `flush` writes them now.
    SQUARE_MEMORY.flush().unwrap();
    assert_eq!(stored_keys(&square::location().unwrap()).len(), 500);
}

/// Parameters that are all primitive values are keyed without the serializer: with the key the
/// documented scheme gives.
static PRIMITIVE_MEMORY: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("primitive-keys")));
static PRIMITIVES: Counter = Counter::new();

#[cached(memory = PRIMITIVE_MEMORY, ignore(verbose))]
#[allow(clippy::too_many_arguments)]
fn primitives(a: u8, b: i64, c: f64, d: bool, e: char, f: usize, g: &u32, verbose: bool) -> f64 {
    PRIMITIVES.bump();
    if verbose {
        eprintln!("computing");
    }
    f64::from(a)
        + b as f64
        + c
        + f64::from(u8::from(d))
        + f64::from(u32::from(e))
        + f as f64
        + f64::from(*g)
}

#[test]
fn primitive_arguments_are_keyed_as_the_key_scheme_says() {
    let some_nan = f64::from_bits(0x7ff8_0000_dead_beef);
    let value = primitives(3, -4, 2.5, true, 'z', 9, &7, false);
    assert_eq!(value, 3.0 - 4.0 + 2.5 + 1.0 + 122.0 + 9.0 + 7.0);
    assert!(primitives(3, -4, some_nan, true, 'z', 9, &7, false).is_nan());
    assert_eq!(PRIMITIVES.get(), 2);
    // Any NaN keys alike, an ignored parameter not at all, and every other value counts.
    assert!(primitives(3, -4, f64::NAN, true, 'z', 9, &7, true).is_nan());
    assert_eq!(PRIMITIVES.get(), 2);
    primitives(3, -4, 2.5, true, 'y', 9, &7, false);
    primitives(3, -4, 2.5, true, 'z', 9, &8, false);
    assert_eq!(PRIMITIVES.get(), 4);

    // The entries are filed under the keys an `ArgsHasher` gives for the same values, in order.
    let key = |c: f64, e: char, g: u32| {
        scheme_key("fast_paths::primitives", primitives::version(), |h| {
            h.arg(&3u8);
            h.arg(&-4i64);
            h.arg(&c);
            h.arg(&true);
            h.arg(&e);
            h.arg(&9usize);
            h.arg(&g);
        })
    };
    let mut expected = vec![
        key(2.5, 'z', 7),
        key(f64::NAN, 'z', 7),
        key(2.5, 'y', 7),
        key(2.5, 'z', 8),
    ];
    expected.sort();
    PRIMITIVE_MEMORY.flush().unwrap();
    assert_eq!(stored_keys(&primitives::location().unwrap()), expected);
}

/// Parameters of other shapes, each function in a folder of its own: aliases and references go
/// through the short key or the serializer as their real type says, and either way the key is
/// the documented one.
type Id = u64;
static SHAPES: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("key-shapes")));

#[cached(memory = SHAPES)]
fn by_alias(id: Id, nested: &&u64) -> u64 {
    id + **nested
}

#[cached(memory = SHAPES)]
fn by_pattern((a, b): (u32, u32), maybe: Option<u64>) -> u64 {
    u64::from(a + b) + maybe.unwrap_or(0)
}

#[cached(memory = SHAPES)]
fn too_long_for_short(a: u128, b: u128, c: u128) -> u128 {
    a ^ b ^ c
}

#[cached(memory = SHAPES)]
fn with_text(n: u64, text: &str) -> usize {
    text.len() + n as usize
}

#[cached(memory = SHAPES)]
fn no_arguments() -> u8 {
    7
}

#[test]
fn arguments_of_every_shape_are_keyed_as_the_key_scheme_says() {
    by_alias(5, &&6);
    by_pattern((1, 2), Some(3));
    too_long_for_short(1, 2, 3);
    with_text(4, "four");
    no_arguments();
    SHAPES.flush().unwrap();
    // Each function's one entry is filed under the documented scheme's key for its arguments.
    macro_rules! assert_scheme_key {
        ($function:ident, $args:expr) => {
            assert_eq!(
                stored_keys(&$function::location().unwrap()),
                [scheme_key(
                    concat!("fast_paths::", stringify!($function)),
                    $function::version(),
                    $args,
                )],
                stringify!($function),
            )
        };
    }
    assert_scheme_key!(by_alias, |h| {
        h.arg(&5u64);
        h.arg(&6u64);
    });
    assert_scheme_key!(by_pattern, |h| {
        h.arg(&(1u32, 2u32));
        h.arg(&Some(3u64));
    });
    assert_scheme_key!(too_long_for_short, |h| (1..=3u128).for_each(|x| h.arg(&x)));
    assert_scheme_key!(with_text, |h| {
        h.arg(&4u64);
        h.arg("four");
    });
    assert_scheme_key!(no_arguments, |_| {});
}

static GONE: Counter = Counter::new();

#[cached(memory = TIERED)]
fn deleted_on_disk(x: u64) -> u64 {
    GONE.bump();
    x + 1
}

#[test]
fn memory_keeps_serving_what_the_disk_lost_until_the_function_is_cleared() {
    assert_eq!(deleted_on_disk(1), 2);
    for entry in entry_files(&deleted_on_disk::location().unwrap()) {
        std::fs::remove_file(entry).unwrap();
    }
    // Documented: the tier serves what this process stored, whatever happens on disk.
    assert_eq!(deleted_on_disk(1), 2);
    assert_eq!(GONE.get(), 1);
    deleted_on_disk::clear().unwrap();
    assert_eq!(deleted_on_disk(1), 2);
    assert_eq!(GONE.get(), 2);
}

static FRESH: AtomicBool = AtomicBool::new(true);
static VALIDATED: Counter = Counter::new();

fn still_fresh(_: &EntryMeta) -> bool {
    FRESH.load(Ordering::SeqCst)
}

#[cached(memory = TIERED, validate = still_fresh)]
fn validated(x: u64) -> u64 {
    VALIDATED.bump();
    x * 3
}

#[test]
fn validation_is_checked_on_memory_hits_too() {
    assert_eq!(validated(2), 6);
    assert_eq!(validated(2), 6);
    assert_eq!(VALIDATED.get(), 1);
    FRESH.store(false, Ordering::SeqCst);
    assert_eq!(validated(2), 6);
    assert_eq!(VALIDATED.get(), 2);
    FRESH.store(true, Ordering::SeqCst);
    assert_eq!(validated(2), 6);
    assert_eq!(VALIDATED.get(), 2);
}

static DRAWS: Counter = Counter::new();

/// Not deterministic on purpose: each computation gives a new value.
#[cached(memory = TIERED)]
fn draw(x: u64) -> u64 {
    DRAWS.bump();
    x * 100 + DRAWS.get() as u64
}

#[test]
fn recompute_replaces_the_value_in_memory() {
    let first = draw(1);
    assert_eq!(draw(1), first);
    let second = draw::recompute(1);
    assert_ne!(second, first);
    assert_eq!(draw(1), second);
    assert_eq!(DRAWS.get(), 2);
}

static GROWN: Counter = Counter::new();

/// Its second computation gives a value too large for `SMALL_TIER`'s slots.
#[cached(memory = SMALL_TIER)]
fn grows(x: u64) -> Vec<u8> {
    GROWN.bump();
    vec![x as u8; if GROWN.get() == 1 { 10 } else { 8192 }]
}

#[test]
fn a_recomputed_value_too_large_for_memory_replaces_the_small_one() {
    assert_eq!(grows(3).len(), 10);
    assert_eq!(grows(3).len(), 10, "served from memory");
    assert_eq!(grows::recompute(3).len(), 8192);
    // Not kept in memory (over 1/128 of the tier): the old small value must not be served.
    assert_eq!(grows(3).len(), 8192);
    assert_eq!(GROWN.get(), 2);
}

static SMALL_TIER: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("small-tier")).memory_tier(128 * 1024));
static NO_TIER: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("no-tier")).memory_tier(0));

#[cached(memory = SMALL_TIER)]
fn big_in_small_tier(n: usize) -> Vec<u8> {
    vec![7; n]
}

#[cached(memory = SMALL_TIER)]
fn many_in_small_tier(x: u64) -> u64 {
    x ^ 0x5555
}

#[cached(memory = NO_TIER)]
fn without_tier(x: u64) -> u64 {
    x + 5
}

#[test]
fn the_tier_is_bounded_and_can_be_turned_off() {
    assert_eq!(SMALL_TIER.memory_tier_size(), 128 * 1024);
    // 4 KiB is more than 1/128 of the tier: read from disk every time.
    assert_eq!(big_in_small_tier(4096).len(), 4096);
    let before = SMALL_TIER.stats();
    assert_eq!(big_in_small_tier(4096), vec![7; 4096]);
    let after = SMALL_TIER.stats();
    assert_eq!(
        (
            after.hits - before.hits,
            after.memory_hits - before.memory_hits
        ),
        (1, 0)
    );

    // Far more small values than fit: the oldest fall back to disk hits, all values right.
    for x in 0..3000 {
        many_in_small_tier(x);
    }
    let before = SMALL_TIER.stats();
    for x in (0..3000).rev() {
        assert_eq!(many_in_small_tier(x), x ^ 0x5555);
    }
    let after = SMALL_TIER.stats();
    assert_eq!(after.hits - before.hits, 3000);
    let in_memory = after.memory_hits - before.memory_hits;
    assert!(in_memory > 0 && in_memory < 3000, "{in_memory} memory hits");

    assert_eq!(NO_TIER.memory_tier_size(), 0);
    without_tier(1);
    assert_eq!(without_tier(1), 6);
    assert_eq!(NO_TIER.stats().memory_hits, 0);
    assert_eq!(NO_TIER.stats().hits, 1);
}

static NUMBERS: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("numbers")).memory_tier(0));
static SUMS: Counter = Counter::new();
static OWNED_SUMS: Counter = Counter::new();

#[cached(memory = NUMBERS)]
fn sum(values: &[f64]) -> f64 {
    SUMS.bump();
    values.iter().sum()
}

#[cached(memory = NUMBERS)]
fn owned_sum(values: Vec<i32>, scale: i32) -> i64 {
    OWNED_SUMS.bump();
    values.iter().map(|&v| i64::from(v * scale)).sum()
}

#[test]
fn slices_of_numbers_are_keyed_by_every_element() {
    let mut values: Vec<f64> = (0..300_000).map(f64::from).collect();
    let total = sum(&values);
    assert_eq!(sum(&values), total);
    assert_eq!(SUMS.get(), 1);
    values[299_999] += 1.0;
    assert_eq!(sum(&values), total + 1.0);
    assert_eq!(SUMS.get(), 2);
    // One NaN is any NaN; -0.0 is not 0.0.
    let nan = [1.0, f64::NAN];
    let other_nan = [1.0, f64::from_bits(f64::NAN.to_bits() | 1)];
    assert!(sum(&nan).is_nan());
    assert!(sum(&other_nan).is_nan());
    assert_eq!(SUMS.get(), 3);
    sum(&[0.0]);
    sum(&[-0.0]);
    assert_eq!(SUMS.get(), 5);
    assert!(sum::is_cached(&[-0.0]));
    assert!(!sum::is_cached(&[-1.0]));

    assert_eq!(owned_sum(vec![1, 2, 3], 2), 12);
    assert_eq!(owned_sum(vec![1, 2, 3], 2), 12);
    assert_eq!(owned_sum(vec![1, 2, 3], 3), 18);
    assert_eq!(owned_sum(vec![1, 2], 2), 6);
    assert_eq!(OWNED_SUMS.get(), 3);
}

/// The same function three times: served from memory, from the packs, from files of their own.
static NAN_TIERED: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("nan-tiered")));
static NAN_PACKED: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(fresh_dir("nan-packed")).memory_tier(0));
static NAN_FILES: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("nan-files"))
        .memory_tier(0)
        .pack_limit(0)
});
static NAN_SUMS: [Counter; 3] = [Counter::new(), Counter::new(), Counter::new()];

#[cached(memory = NAN_TIERED)]
fn nan_count_tiered(values: &[f64]) -> usize {
    NAN_SUMS[0].bump();
    values.iter().filter(|v| v.is_nan()).count()
}

#[cached(memory = NAN_PACKED)]
fn nan_count_packed(values: Vec<f64>) -> usize {
    NAN_SUMS[1].bump();
    values.iter().filter(|v| v.is_nan()).count()
}

#[cached(memory = NAN_FILES)]
fn nan_count_files(values: &Vec<f64>) -> usize {
    NAN_SUMS[2].bump();
    values.iter().filter(|v| v.is_nan()).count()
}

#[test]
fn large_slices_of_floats_key_every_nan_alike_however_they_are_looked_up() {
    // Large enough (800 KB) to be hashed before it is looked at.
    let with_nan = |bits: u64| {
        let mut values: Vec<f64> = (0..100_000).map(f64::from).collect();
        values[77_777] = f64::from_bits(bits);
        values
    };
    let canonical = f64::NAN.to_bits();
    type Call<'a> = (&'a dyn Fn(&[f64]) -> usize, &'a dyn Fn(&[f64]) -> bool);
    let calls: [Call<'_>; 3] = [
        (&|v| nan_count_tiered(v), &|v| {
            nan_count_tiered::is_cached(v)
        }),
        (&|v| nan_count_packed(v.to_vec()), &|v| {
            nan_count_packed::is_cached(v.to_vec())
        }),
        (&|v| nan_count_files(&v.to_vec()), &|v| {
            nan_count_files::is_cached(&v.to_vec())
        }),
    ];
    for (i, (call, is_cached)) in calls.into_iter().enumerate() {
        let runs = || NAN_SUMS[i].get();
        // Stored from a NaN that is not the canonical one: under the canonical key.
        assert_eq!(call(&with_nan(canonical | 1)), 1);
        assert_eq!(runs(), 1, "function {i}");
        // The canonical NaN's bytes are the key's: found as they are.
        assert_eq!(call(&with_nan(canonical)), 1);
        // Another NaN: not found as it is, then looked at, then found in canonical form.
        assert_eq!(call(&with_nan(canonical | 7)), 1);
        assert!(is_cached(&with_nan(canonical | 9)));
        assert!(is_cached(&with_nan((-f64::NAN).to_bits())));
        assert_eq!(runs(), 1, "function {i}");
        // Without a NaN: a new key, then a hit.
        let plain = with_nan(0.5f64.to_bits());
        assert!(!is_cached(&plain));
        assert_eq!(call(&plain), 0);
        assert_eq!(call(&plain), 0);
        assert_eq!(runs(), 2, "function {i}");
    }
}

/// Entries in files of their own: the tests read and damage them.
static ARRAYS: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("arrays"))
        .memory_tier(0)
        .pack_limit(0)
});
static PACKED: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("arrays-packed"))
        .memory_tier(0)
        .compression(Some(3))
        .pack_limit(0)
});
static MADE: Counter = Counter::new();

#[cached(memory = ARRAYS)]
fn make(n: u64) -> Vec<f64> {
    MADE.bump();
    let mut values: Vec<f64> = (0..n).map(|i| i as f64 * 0.25).collect();
    if n > 2 {
        values[1] = -0.0;
        values[2] = f64::from_bits(f64::NAN.to_bits() | 7);
    }
    values
}

#[cached(memory = PACKED)]
fn make_packed(n: u32) -> Vec<u32> {
    (0..n).map(|i| i * 3).collect()
}

#[cached(memory = ARRAYS)]
fn pairs(n: u8) -> Vec<(u8, u8)> {
    (0..n).map(|i| (i, i)).collect()
}

#[test]
fn vecs_of_numbers_are_stored_raw_and_come_back_bit_for_bit() {
    let first = make(100_000);
    let again = make(100_000);
    assert_eq!(MADE.get(), 1);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first), bits(&again));
    assert_eq!(again[2].to_bits(), f64::NAN.to_bits() | 7);

    // The entry says so in its header (flags, offset 6: bit 1), and holds the raw bytes.
    let entry = &entry_files(&make::location().unwrap())[0];
    let bytes = std::fs::read(entry).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 2);
    assert_eq!(bytes.len(), 72 + 8 + 100_000 * 8);
    assert_eq!(&bytes[80 + 8..88 + 8], &(-0.0f64).to_le_bytes());

    // Compressed: both flags, same values.
    assert_eq!(make_packed(50_000), make_packed(50_000));
    let entry = &entry_files(&make_packed::location().unwrap())[0];
    let bytes = std::fs::read(entry).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 3);
    assert!(bytes.len() < 50_000 * 4);

    // Other element types go through MessagePack.
    assert_eq!(pairs(3), vec![(0, 0), (1, 1), (2, 2)]);
    let entry = &entry_files(&pairs::location().unwrap())[0];
    let bytes = std::fs::read(entry).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 0);
    assert_eq!(pairs(3), vec![(0, 0), (1, 1), (2, 2)]);
}

static CUT: Counter = Counter::new();

#[cached(memory = ARRAYS)]
fn cut_short(n: u64) -> Vec<u64> {
    CUT.bump();
    (0..n).collect()
}

#[test]
fn a_numbers_entry_whose_payload_is_not_whole_elements_is_a_miss() {
    assert_eq!(cut_short(10).len(), 10);
    let entry = entry_files(&cut_short::location().unwrap())[0].clone();
    let bytes = std::fs::read(&entry).unwrap();
    // Drop 3 bytes of the last element and re-checksum: a valid entry whose payload is not a
    // whole number of u64.
    common::rewrite_entry(&entry, None, Some(&bytes[72..bytes.len() - 3]));
    assert_eq!(cut_short(10), (0..10).collect::<Vec<_>>());
    assert_eq!(CUT.get(), 2);
}

static LARGE_MADE: Counter = Counter::new();

#[cached(memory = ARRAYS)]
fn make_large(n: u64) -> Vec<f64> {
    LARGE_MADE.bump();
    (0..n).map(|i| i as f64 - 0.5).collect()
}

#[test]
fn a_large_vec_of_numbers_is_verified_as_it_is_read_and_a_damaged_one_is_a_miss() {
    // 1.6 MB of elements: copied on two threads while one verifies the checksum. 2.4 MB: with
    // a checksum by blocks (flags bit 2), copied and verified block by block on every thread.
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
    for (n, blocks) in [(200_000u64, false), (300_000, true)] {
        let expected: Vec<u64> = (0..n).map(|i| (i as f64 - 0.5).to_bits()).collect();
        let made = LARGE_MADE.get();
        assert_eq!(bits(make_large(n)), expected);
        assert_eq!(bits(make_large(n)), expected);
        assert_eq!(LARGE_MADE.get(), made + 1);

        let size = 72 + 8 + 8 * n;
        let entry = entry_files(&make_large::location().unwrap())
            .into_iter()
            .find(|path| std::fs::metadata(path).unwrap().len() == size)
            .unwrap();
        let intact = std::fs::read(&entry).unwrap();
        let flags = u16::from_le_bytes([intact[6], intact[7]]);
        assert_eq!(flags, if blocks { 2 | 4 } else { 2 });
        // One bit changed near the start, then near the end: each time a miss, computed and
        // stored again.
        for (at, made) in [(72 + 8 + 100, made + 2), (intact.len() - 100, made + 3)] {
            let mut damaged = intact.clone();
            damaged[at] ^= 0x01;
            std::fs::write(&entry, &damaged).unwrap();
            assert_eq!(bits(make_large(n)), expected, "byte {at}");
            assert_eq!(LARGE_MADE.get(), made, "byte {at}");
            let stored = std::fs::read(&entry).unwrap();
            assert!(stored[72..] == intact[72..], "stored again, byte {at}");
        }
    }
}

static DURABLE: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("durable"))
        .durable(true)
        .memory_tier(0)
});
static DURABLE_RUNS: Counter = Counter::new();

#[cached(memory = DURABLE)]
fn durable_double(x: u64) -> u64 {
    DURABLE_RUNS.bump();
    x * 2
}

#[test]
fn durable_writes_store_and_read_back_like_the_others() {
    assert!(DURABLE.is_durable());
    for x in 0..20 {
        assert_eq!(durable_double(x), x * 2);
    }
    for x in 0..20 {
        assert_eq!(durable_double(x), x * 2);
    }
    assert_eq!(DURABLE_RUNS.get(), 20);
    assert_eq!(stored_keys(&durable_double::location().unwrap()).len(), 20);
    // An overwrite takes the other path (the name exists): still durable, still right.
    assert_eq!(durable_double::recompute(3), 6);
    assert_eq!(DURABLE.verify().unwrap().valid, 20);
}

static SIGNALS: Counter = Counter::new();

#[cached(memory = ARRAYS)]
fn signal(n: usize) -> memo::Array<f64> {
    SIGNALS.bump();
    (0..n).map(|i| (i as f64).sin()).collect()
}

#[cached(memory = PACKED)]
fn packed_signal(n: usize) -> memo::Array<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn a_large_array_hit_is_read_in_place_and_outlives_its_entry() {
    let expected: Vec<f64> = (0..600_000).map(|i| (i as f64).sin()).collect();
    let first = signal(600_000);
    assert!(!first.is_mapped(), "a computed value is held in memory");
    let hit = signal(600_000);
    assert_eq!(SIGNALS.get(), 1);
    assert!(hit.is_mapped(), "4.8 MB: served from the mapped entry");
    assert_eq!(hit[..], expected[..]);
    assert_eq!(hit, first);

    // Small: read into memory.
    let small = signal(10);
    let small_hit = signal(10);
    assert!(!small_hit.is_mapped());
    assert_eq!(small, small_hit);

    // Removing the entry does not change a mapped value.
    signal::clear().unwrap();
    assert_eq!(hit[599_999], expected[599_999]);
    assert_eq!(hit.into_vec(), expected);

    // A compressed entry is decompressed into memory.
    let packed = packed_signal(2_000_000);
    let packed_hit = packed_signal(2_000_000);
    assert!(!packed_hit.is_mapped());
    assert_eq!(packed, packed_hit);
}

/// A point where a thread stops until the test lets it go on: [`Gate::hold`] arms it for the
/// next thread that passes, which tells the test when it is there.
struct Gate(std::sync::Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>);

impl Gate {
    const fn new() -> Self {
        Gate(std::sync::Mutex::new(None))
    }

    /// Arms the gate: gives (a word when a thread stopped there, the word to let it go on).
    fn hold(&self) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (there, reached) = mpsc::channel();
        let (go, wait) = mpsc::channel();
        *self.0.lock().unwrap() = Some((there, wait));
        (reached, go)
    }

    /// Stops here when the gate is armed (the first thread to pass disarms it).
    fn pass(&self) {
        let armed = self.0.lock().unwrap().take();
        if let Some((there, wait)) = armed {
            there.send(()).unwrap();
            wait.recv().unwrap();
        }
    }
}

/// Entries in files of their own: a value read from the disk enters memory at its first read.
static RACED: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("raced")).pack_limit(0));
/// The tests that stop a decoding run one at a time (they share its gate).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
static DECODING: Gate = Gate::new();

/// A value whose decoding can be stopped in the middle: a slow read from the disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Slow(usize);

impl<'de> Deserialize<'de> for Slow {
    fn deserialize<D: Deserializer<'de>>(from: D) -> Result<Self, D::Error> {
        let value = usize::deserialize(from)?;
        DECODING.pass();
        Ok(Slow(value))
    }
}

/// Calls `f(1)` (stored, and out of memory) on another thread and runs `meanwhile` while that
/// call decodes the value it read from the disk; what the call returned.
fn while_read_from_disk(f: fn(u64) -> Slow, meanwhile: impl FnOnce()) -> Slow {
    RACED.clear_memory_tier();
    let (reached, go) = DECODING.hold();
    let reader = std::thread::spawn(move || f(1));
    reached.recv().unwrap();
    meanwhile();
    go.send(()).unwrap();
    reader.join().unwrap()
}

static RECOMPUTED: Counter = Counter::new();

#[cached(memory = RACED)]
fn recomputed_while_read(x: u64) -> Slow {
    let _ = x;
    RECOMPUTED.bump();
    Slow(RECOMPUTED.get())
}

#[test]
fn a_value_read_while_it_was_computed_again_does_not_replace_the_new_one_in_memory() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(recomputed_while_read(1), Slow(1));
    let read = while_read_from_disk(recomputed_while_read, || {
        assert_eq!(recomputed_while_read::recompute(1), Slow(2));
    });
    assert_eq!(read, Slow(1), "the reader had the old value");
    assert_eq!(recomputed_while_read(1), Slow(2));
    assert_eq!(RECOMPUTED.get(), 2);
}

static CLEARED: Counter = Counter::new();

#[cached(memory = RACED)]
fn cleared_while_read(x: u64) -> Slow {
    let _ = x;
    CLEARED.bump();
    Slow(CLEARED.get())
}

#[test]
fn a_value_read_while_it_was_cleared_does_not_come_back_from_memory() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(cleared_while_read(1), Slow(1));
    let read = while_read_from_disk(cleared_while_read, || cleared_while_read::clear().unwrap());
    assert_eq!(read, Slow(1));
    assert_eq!(
        cleared_while_read(1),
        Slow(2),
        "computed again after the clear"
    );
}

static SOURCE: AtomicU64 = AtomicU64::new(10);
static COMPUTING: Gate = Gate::new();

/// Reads data that changes: what `recompute` is for.
#[cached(memory = RACED)]
fn reads_source(x: u64) -> u64 {
    let _ = x;
    let value = SOURCE.load(Ordering::SeqCst);
    COMPUTING.pass();
    value
}

#[test]
fn recompute_does_not_take_the_value_of_a_computation_that_began_before_it() {
    let (reached, go) = COMPUTING.hold();
    let before = std::thread::spawn(|| reads_source(7));
    reached.recv().unwrap();
    SOURCE.store(20, Ordering::SeqCst);
    let refresh = std::thread::spawn(|| reads_source::recompute(7));
    // Time for the refresh to find the other computation under way (if it does not, it
    // computes at once: the test then passes without showing anything).
    std::thread::sleep(std::time::Duration::from_millis(200));
    go.send(()).unwrap();
    assert_eq!(before.join().unwrap(), 10);
    assert_eq!(refresh.join().unwrap(), 20);
    assert_eq!(reads_source(7), 20);
}

#[cached(memory = TIERED)]
fn neighbour(i: u32) -> u32 {
    i
}

/// A validation that calls cached functions, whose keys fall in every shard of the tier.
fn calls_cached_functions(_: &EntryMeta) -> bool {
    (0..64).all(|i| neighbour(i) == i)
}

#[cached(memory = TIERED, validate = calls_cached_functions)]
fn validated_by_cached_calls(x: u32) -> u32 {
    x + 1
}

#[test]
fn a_validation_that_calls_cached_functions_does_not_deadlock() {
    let (done, finished) = mpsc::channel();
    let calls = std::thread::spawn(move || {
        for i in 0..64 {
            assert_eq!(neighbour(i), i);
        }
        for x in 0..8 {
            assert_eq!(validated_by_cached_calls(x), x + 1);
            // From memory: validated there, while other calls go through the tier.
            assert_eq!(validated_by_cached_calls(x), x + 1);
        }
        done.send(()).unwrap();
    });
    match finished.recv_timeout(std::time::Duration::from_secs(60)) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("a validation calling cached functions hung")
        }
        _ => calls.join().unwrap(),
    }
}
