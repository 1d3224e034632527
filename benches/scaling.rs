//! How memo behaves as one function's cache grows: W1 (a small-key hit), W2 (a small miss and
//! its store) and the warm W6 rerun (2,000 hits through `.par_cached_map`), measured at cache
//! sizes of 1,000 up to `MAX` entries, with the process's resident memory.
//!
//! ```sh
//! cargo bench --bench scaling                 # up to 100,000 entries (about a minute)
//! cargo bench --bench scaling -- 1000000      # up to 1,000,000 (several minutes, ~4 GB of disk)
//! cargo bench --bench scaling -- --fill 1000000   # the slowest calls of a fill (a few seconds)
//! ```
//!
//! One line per size: entries, W1 hit from the memory tier, W1 hit from disk (the tier emptied
//! first), W2 miss + store, warm W6 wall time (2,000 hits), resident memory.
//! Every figure is a median of 3; every value is checked. The cache lives in a fresh temporary
//! folder, deleted at the end.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use memo::prelude::*;

mod common;

static ROOT: LazyLock<std::path::PathBuf> =
    LazyLock::new(|| tempfile::tempdir().expect("temporary folder").keep());
static TIERED: LazyLock<Memory> = LazyLock::new(|| Memory::new(&*ROOT));

static RUNS: AtomicU64 = AtomicU64::new(0);

fn body(x: u64) -> u64 {
    RUNS.fetch_add(1, Ordering::Relaxed);
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cached(memory = TIERED)]
fn fill(x: u64) -> u64 {
    body(x)
}

/// The function of `--fill`, whose cache starts empty.
#[cached(memory = TIERED)]
fn fill_in_turn(x: u64) -> u64 {
    body(x)
}

/// `--fill N`: N misses in turn on one thread, each timed: the mean, how many took over a
/// millisecond, and the slowest five (the calls during which the in-memory tables grew), then the
/// resident memory. Tail latency, which the medians of the main run do not show.
fn fill_run(n: u64) {
    let mut slowest: Vec<(Duration, u64)> = Vec::new();
    let mut over_1ms = 0;
    let start = Instant::now();
    for x in 0..n {
        let call = Instant::now();
        assert_eq!(fill_in_turn(black_box(x)), body_value(x));
        let took = call.elapsed();
        over_1ms += usize::from(took > Duration::from_millis(1));
        if slowest.len() < 5 || took > slowest[4].0 {
            slowest.push((took, x));
            slowest.sort_by(|a, b| b.cmp(a));
            slowest.truncate(5);
        }
    }
    let mean = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert_eq!(
        RUNS.load(Ordering::Relaxed),
        n,
        "every call of the fill computes"
    );
    let slowest: Vec<String> = slowest
        .iter()
        .map(|(took, x)| format!("{:.1} ms (call {})", took.as_secs_f64() * 1e3, x + 1))
        .collect();
    println!(
        "{n} misses in turn: {mean:.2} µs per call, {over_1ms} over 1 ms, slowest {}; {:.0} MiB resident",
        slowest.join(", "),
        resident_mib()
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A cheap, fixed pseudo-random sequence (splitmix64) over the stored keys.
fn sample(n: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        })
        .collect()
}

/// Resident memory after handing freed memory back to the system (glibc keeps the peak of the
/// parallel fill otherwise), so that the figure is what the process holds.
fn resident_mib() -> f64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free memory of glibc's heap to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Per-call nanoseconds of `f` over `keys`, checking each value, with the body never run.
fn hits(keys: &[u64], f: impl Fn(u64) -> u64) -> f64 {
    let before = RUNS.load(Ordering::Relaxed);
    let start = Instant::now();
    for &x in keys {
        assert_eq!(f(black_box(x)), x.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    let took = start.elapsed().as_nanos() as f64 / keys.len() as f64;
    assert_eq!(RUNS.load(Ordering::Relaxed), before, "hits ran the body");
    took
}

fn main() {
    let _cleanup = common::RemoveOnDrop(ROOT.clone());
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--fill") {
        let n = args
            .get(at + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        fill_run(n);
        return;
    }
    let max: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let mut sizes = vec![1_000u64, 10_000, 100_000, 1_000_000];
    sizes.retain(|&s| s <= max);
    println!(
        "{:>9} | {:>14} | {:>12} | {:>12} | {:>12} | {:>8}",
        "entries", "W1 memory (ns)", "W1 disk (ns)", "W2 (us)", "W6 warm (ms)", "RSS (MiB)"
    );
    let mut stored = 0u64;
    // Miss keys for W2 live above every stored key.
    let mut fresh = 1u64 << 40;
    for size in sizes {
        // Grow the cache to `size` entries, in parallel (not timed).
        let new: Vec<u64> = (stored..size).collect();
        let _: Vec<u64> = new.into_iter().par_cached_map(fill).collect();
        stored = size;
        // Let the kernel write the new files out now rather than during the timings.
        #[cfg(unix)]
        // SAFETY: `sync` takes no arguments and cannot fail.
        unsafe {
            libc::sync()
        };

        // W1: 1,000 keys of the cache called in turn 20 times (after two warming passes: a
        // value read from disk enters the memory tier on its second read).
        let hot: Vec<u64> = sample(size, 1_000, size);
        let keys: Vec<u64> = (0..20).flat_map(|_| hot.iter().copied()).collect();
        hits(&hot, fill);
        hits(&hot, fill);
        let w1_memory = median((0..3).map(|_| hits(&keys, fill)).collect());
        // Disk hits on 5,000 other keys.
        let keys = sample(size, 5_000, size + 2);
        // Disk hits: the memory tier emptied before each pass, so every key is read from disk.
        let w1_disk = median(
            (0..3)
                .map(|_| {
                    TIERED.clear_memory_tier();
                    hits(&keys, fill)
                })
                .collect(),
        );

        let w2 = median(
            (0..3)
                .map(|_| {
                    let before = RUNS.load(Ordering::Relaxed);
                    let start = Instant::now();
                    for _ in 0..1_000 {
                        fresh += 1;
                        assert_eq!(fill(black_box(fresh)), body_value(fresh));
                    }
                    let took = start.elapsed().as_nanos() as f64 / 1_000.0 / 1_000.0;
                    assert_eq!(RUNS.load(Ordering::Relaxed) - before, 1_000);
                    took
                })
                .collect(),
        );

        let items = sample(size, 2_000, size + 1);
        // A warm rerun finds its values in memory, as after W6's cold run.
        hits(&items, fill);
        hits(&items, fill);
        let w6 = median(
            (0..3)
                .map(|_| {
                    let before = RUNS.load(Ordering::Relaxed);
                    let start = Instant::now();
                    let results: Vec<u64> = items.iter().copied().par_cached_map(fill).collect();
                    let took = start.elapsed().as_secs_f64() * 1e3;
                    assert_eq!(
                        RUNS.load(Ordering::Relaxed),
                        before,
                        "warm rerun ran the body"
                    );
                    assert_eq!(results[7], body_value(items[7]));
                    took
                })
                .collect(),
        );
        println!(
            "{size:>9} | {w1_memory:>14.0} | {w1_disk:>12.0} | {w2:>12.1} | {w6:>12.2} | {:>8.0}",
            resident_mib()
        );
    }
}

fn body_value(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
