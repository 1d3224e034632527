//! Benchmarks of `.par_cached_map(f)`: per-item overhead of a warm rerun and of a cold run of
//! trivial items, and wall time of CPU-bound items against the ideal (items x cost / threads).
//!
//! `cargo bench --bench par_map` prints one line per figure (medians of a few runs). The cache
//! lives in a fresh temporary folder.

use std::hint::black_box;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use memo::prelude::*;

mod common;

static MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temporary folder");
    Memory::new(dir.keep())
});

#[cached(memory = MEMORY)]
fn trivial(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Iterations of `spin` that take about 1 ms, calibrated at start-up.
static ITERS: LazyLock<u64> = LazyLock::new(|| {
    let mut iters = 1_000;
    loop {
        let start = Instant::now();
        black_box(spin_raw(0, iters));
        let took = start.elapsed();
        if took >= Duration::from_millis(20) {
            return (iters as f64 * 0.001 / took.as_secs_f64()).round() as u64;
        }
        iters *= 2;
    }
});

fn spin_raw(i: u64, iters: u64) -> u64 {
    let mut s = 0u64;
    for k in 0..iters {
        s = (s * 31 + k + i) % 1_000_003;
    }
    s
}

#[cached(memory = MEMORY)]
fn spin(i: u64) -> u64 {
    spin_raw(i, *ITERS)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let _cleanup = common::RemoveOnDrop(MEMORY.location().expect("enabled").to_path_buf());
    const N: u64 = 100_000;
    const REPS: u64 = 3;
    let threads = rayon::current_num_threads();

    // Cold: every item is a miss (new keys each repetition): look-up, compute, store.
    let mut cold = Vec::new();
    for r in 0..REPS {
        let items = (r + 1) * 10_000_000..(r + 1) * 10_000_000 + N;
        let start = Instant::now();
        let out = items
            .clone()
            .par_cached_map(trivial)
            .progress(false)
            .run()
            .unwrap();
        cold.push(start.elapsed().as_secs_f64() * 1e6 / N as f64);
        assert_eq!(out.computed, N as usize);
        assert_eq!(out.results[5], trivial::call_uncached(items.start + 5));
    }
    println!("par_map/100k-trivial-misses  {:>9.2} µs/item", median(cold));

    // Warm: the same items again, all hits.
    let mut warm = Vec::new();
    for r in 0..REPS {
        let items = (r + 1) * 10_000_000..(r + 1) * 10_000_000 + N;
        let start = Instant::now();
        let out = items.par_cached_map(trivial).progress(false).run().unwrap();
        warm.push(start.elapsed().as_secs_f64() * 1e6 / N as f64);
        assert_eq!(out.from_cache, N as usize);
    }
    println!("par_map/100k-trivial-hits    {:>9.2} µs/item", median(warm));

    // CPU-bound: 2,000 items of about 1 ms on all threads, against the ideal.
    const ITEMS: u64 = 2_000;
    LazyLock::force(&ITERS); // calibrate before timing anything
                             // The cost of one item, measured through the same code path: a sequential map of fresh keys.
    let sequential = 900_000_000..900_000_400u64;
    let start = Instant::now();
    let out = sequential
        .par_cached_map(spin)
        .jobs(1)
        .progress(false)
        .run()
        .unwrap();
    let cost = start.elapsed().as_secs_f64() / 400.0;
    assert_eq!(out.computed, 400);
    let ideal = ITEMS as f64 * cost / threads as f64;
    let mut ratios = Vec::new();
    let mut warm_ms = Vec::new();
    for r in 0..REPS {
        let items = r * 1_000_000..r * 1_000_000 + ITEMS;
        let start = Instant::now();
        let out = items
            .clone()
            .par_cached_map(spin)
            .progress(false)
            .run()
            .unwrap();
        ratios.push(start.elapsed().as_secs_f64() / ideal);
        assert_eq!(out.computed, ITEMS as usize);
        let start = Instant::now();
        let again = items.par_cached_map(spin).progress(false).run().unwrap();
        warm_ms.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(
            (again.from_cache, again.results),
            (ITEMS as usize, out.results)
        );
    }
    println!(
        "par_map/2000x1ms-cpu          {:>9.3} x ideal (item {:.3} ms, {threads} threads, ideal {:.0} ms)",
        median(ratios),
        cost * 1e3,
        ideal * 1e3
    );
    println!("par_map/2000-warm-rerun       {:>9.2} ms", median(warm_ms));
}
