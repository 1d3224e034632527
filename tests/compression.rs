//! zstd compression: recorded in each entry's header, so compressed and plain entries mix in one
//! cache and readers never guess; per memory, overridden per function.
//!
//! These tests change entries on disk behind the process's back, so their caches run without the
//! in-process memory tier (`memory_tier(0)`): every call reads the disk. `tests/fast_paths.rs`
//! covers the tier.

mod common;

use std::sync::LazyLock;

use common::{entry_files, fresh_dir, Counter};
use memo::format::entry::{decode_header, HEADER_LEN};
use memo::prelude::*;

static DIR: LazyLock<std::path::PathBuf> = LazyLock::new(|| fresh_dir("compression"));
/// One folder, two memories: one compresses, one does not.
static COMPRESSED: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(&*DIR)
        .compression(Some(3))
        .memory_tier(0)
        .pack_limit(0)
});
static PLAIN: LazyLock<Memory> = LazyLock::new(|| Memory::new(&*DIR).memory_tier(0).pack_limit(0));

static SERIES: Counter = Counter::new();

/// A repetitive value of about 80 KB: it compresses well.
fn series_value(n: u64) -> Vec<u64> {
    (0..10_000).map(|i| u64::MAX - (i % 7) - n).collect()
}

#[cached(memory = COMPRESSED)]
fn series(n: u64) -> Vec<u64> {
    SERIES.bump();
    series_value(n)
}

#[cached(memory = COMPRESSED, compress = false)]
fn series_plain(n: u64) -> Vec<u64> {
    series_value(n)
}

#[cached(memory = PLAIN, compress = 19)]
fn series_small(n: u64) -> Vec<u64> {
    series_value(n)
}

fn only_entry(location: Option<std::path::PathBuf>) -> std::path::PathBuf {
    let files = entry_files(&location.unwrap());
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[test]
fn compressed_entries_round_trip_and_are_smaller() {
    assert_eq!(series(1), series_value(1));
    assert_eq!(series(1), series_value(1));
    assert_eq!(SERIES.get(), 1, "a hit on a compressed entry");
    series_plain(1);
    series_small(1);

    let compressed = std::fs::read(only_entry(series::location())).unwrap();
    let plain = std::fs::read(only_entry(series_plain::location())).unwrap();
    let smallest = std::fs::read(only_entry(series_small::location())).unwrap();
    assert!(decode_header(&compressed).unwrap().compressed);
    assert!(
        !decode_header(&plain).unwrap().compressed,
        "compress = false wins"
    );
    assert!(
        decode_header(&smallest).unwrap().compressed,
        "compress = 19 wins"
    );
    assert!(
        compressed.len() * 10 < plain.len(),
        "{} bytes compressed, {} plain",
        compressed.len(),
        plain.len()
    );
    assert!(COMPRESSED.verify().unwrap().broken.is_empty());
}

static MIXED: Counter = Counter::new();

#[cached(memory = PLAIN)]
fn mixed_plain(n: u64) -> Vec<u64> {
    MIXED.bump();
    series_value(n)
}

#[test]
fn plain_and_compressed_entries_mix_and_each_is_read_as_its_header_says() {
    // Written plain, then read through a memory that compresses: the same function identity.
    assert_eq!(mixed_plain(5), series_value(5));
    let entry = only_entry(mixed_plain::location());
    let compressed_reader = Memory::new(&*DIR)
        .compression(Some(3))
        .memory_tier(0)
        .pack_limit(0);
    assert!(compressed_reader.verify().unwrap().broken.is_empty());
    assert!(
        !decode_header(&std::fs::read(&entry).unwrap())
            .unwrap()
            .compressed
    );
    assert_eq!(mixed_plain(5), series_value(5));
    assert_eq!(MIXED.get(), 1);
}

static DAMAGED: Counter = Counter::new();
/// A memory of its own: the entry it damages would be a broken entry for the verification of
/// `compressed_entries_round_trip_and_are_smaller`, which runs at the same time.
static DAMAGED_MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("compression-damaged"))
        .compression(Some(3))
        .memory_tier(0)
        .pack_limit(0)
});

#[cached(memory = DAMAGED_MEMORY)]
fn damaged(n: u64) -> Vec<u64> {
    DAMAGED.bump();
    series_value(n)
}

#[test]
fn a_damaged_compressed_payload_is_a_miss() {
    damaged(2);
    let entry = only_entry(damaged::location());
    let mut bytes = std::fs::read(&entry).unwrap();
    bytes[HEADER_LEN + 10] ^= 0xff;
    std::fs::write(&entry, bytes).unwrap();
    assert_eq!(damaged(2), series_value(2));
    assert_eq!(DAMAGED.get(), 2);
    assert_eq!(damaged(2), series_value(2));
    assert_eq!(DAMAGED.get(), 2, "repaired");
}
