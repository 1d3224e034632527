//! Micro-benchmarks of `#[cached]` (divan): `cargo bench --bench cache`.
//!
//! - `small_hit`: a hit on a small key in a warm process (from the memory tier);
//! - `small_hit_disk`: the same with the memory tier off (every hit reads its entry file);
//! - `small_miss_store`: a miss and the store of a small value (a new key each time);
//! - `big_arg_hit`: a hit whose argument is 100 MB of `f64` (mostly the key hashing);
//! - `big_arg_hash_only`: hashing that argument alone, as generated code does (raw bytes);
//! - `big_arg_hash_serde`: hashing it through serde, as a `Vec<f64>` inside another type is;
//! - `big_result_hit`: a hit whose result is 100 MB of `f64` (reading, checking, decoding);
//! - `big_array_hit`: the same as a `memo::Array<f64>`, read in place from the mapped entry.
//!
//! Every benchmark checks its result. The cache lives in a fresh temporary folder, removed at
//! the end.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use divan::counter::BytesCount;
use divan::Bencher;
use memo::prelude::*;

mod common;

static MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temporary folder");
    Memory::new(dir.keep())
});

/// 12,500,000 `f64` = 100,000,000 bytes.
const BIG: usize = 12_500_000;
const BIG_BYTES: u64 = (BIG * 8) as u64;

static DISK: LazyLock<Memory> = LazyLock::new(|| {
    let dir = MEMORY.location().expect("enabled").join("disk");
    Memory::new(dir).memory_tier(0)
});

static BIG_ARG: LazyLock<Vec<f64>> = LazyLock::new(|| (0..BIG).map(|i| i as f64).collect());

#[cached(memory = MEMORY)]
fn square(x: u64) -> u64 {
    x * x
}

#[cached(memory = MEMORY)]
fn square_stored(x: u64) -> u64 {
    x * x
}

#[cached(memory = MEMORY)]
fn total(values: &[f64]) -> f64 {
    values.iter().sum()
}

#[cached(memory = DISK)]
fn square_disk(x: u64) -> u64 {
    x * x
}

#[cached(memory = MEMORY)]
fn make(n: u64) -> Vec<f64> {
    (0..n).map(|i| i as f64).collect()
}

#[cached(memory = MEMORY)]
fn make_array(n: u64) -> memo::Array<f64> {
    (0..n).map(|i| i as f64).collect()
}

/// Hits of `f` on 1,000 small keys stored first, in turn.
fn small_hits(bencher: Bencher, f: fn(u64) -> u64) {
    for x in 0..1000 {
        f(x);
    }
    let mut x = 0u64;
    bencher.bench_local(|| {
        x = (x + 1) % 1000;
        let value = f(black_box(x));
        assert_eq!(value, x * x);
        value
    });
}

#[divan::bench]
fn small_hit_disk(bencher: Bencher) {
    small_hits(bencher, square_disk);
}

#[divan::bench]
fn small_hit(bencher: Bencher) {
    small_hits(bencher, square);
}

#[divan::bench]
fn small_miss_store(bencher: Bencher) {
    static NEXT: AtomicU64 = AtomicU64::new(1 << 40);
    bencher.bench_local(|| {
        let x = NEXT.fetch_add(1, Ordering::Relaxed);
        let value = square_stored(black_box(x));
        assert_eq!(value, x.wrapping_mul(x));
        value
    });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn big_arg_hit(bencher: Bencher) {
    let values = &*BIG_ARG;
    let expected = total(values);
    bencher.counter(BytesCount::new(BIG_BYTES)).bench_local(|| {
        let value = total(black_box(values));
        assert_eq!(value, expected);
        value
    });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn big_arg_hash_only(bencher: Bencher) {
    let values = &*BIG_ARG;
    bencher.counter(BytesCount::new(BIG_BYTES)).bench_local(|| {
        let mut hasher = memo::format::key::ArgsHasher::new("bench::total", "v");
        hasher.numbers(black_box(&values[..]));
        hasher.finish().expect("hashable")
    });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn big_arg_hash_serde(bencher: Bencher) {
    let values = &*BIG_ARG;
    bencher.counter(BytesCount::new(BIG_BYTES)).bench_local(|| {
        let mut hasher = memo::format::key::ArgsHasher::new("bench::total", "v");
        hasher.arg(black_box(&values[..]));
        hasher.finish().expect("hashable")
    });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn big_array_hit(bencher: Bencher) {
    let n = BIG as u64;
    assert_eq!(make_array(n).len(), BIG);
    bencher.counter(BytesCount::new(BIG_BYTES)).bench_local(|| {
        let value = make_array(black_box(n));
        assert!(value.is_mapped());
        assert_eq!((value.len(), value[BIG - 1]), (BIG, (BIG - 1) as f64));
        value
    });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn big_result_hit(bencher: Bencher) {
    let n = BIG as u64;
    assert_eq!(make(n).len(), BIG);
    bencher.counter(BytesCount::new(BIG_BYTES)).bench_local(|| {
        let value = make(black_box(n));
        assert_eq!((value.len(), value[BIG - 1]), (BIG, (BIG - 1) as f64));
        value // dropped by divan outside the timed region
    });
}

fn main() {
    let _cleanup = common::RemoveOnDrop(MEMORY.location().expect("enabled").to_path_buf());
    divan::main();
    if let Some(dir) = MEMORY.location() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
