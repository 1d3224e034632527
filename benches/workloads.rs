//! memo on the six peer workloads (W1–W6) of `../shared/bench/README.md`, printing the same JSON
//! lines as the peers' runners (`"system": "memo-0.1.0"`), so that
//! `../shared/bench/run_peers.sh --with '<this runner>'` puts memo beside joblib and `cached`.
//!
//! ```sh
//! cargo bench --bench workloads              # all six
//! cargo bench --bench workloads -- W1 W4     # some
//! ```
//!
//! Every figure is a median of 5; every hit is checked to have run its body 0 times and every
//! miss exactly once, and every value is checked, so a broken cache fails instead of printing a
//! figure. All caches live in one fresh temporary folder, deleted at the end.

use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use memo::prelude::*;
use rayon::iter::{IntoParallelRefIterator, ParallelIterator};

mod common;

const SYSTEM: &str = "memo-0.1.0";
const REPS: usize = 5;

/// The runner's temporary folder; every workload's cache is a folder in it.
static ROOT: LazyLock<std::path::PathBuf> =
    LazyLock::new(|| tempfile::tempdir().expect("temporary folder").keep());

fn memory(name: &str) -> Memory {
    Memory::new(ROOT.join(name))
}

static W1: LazyLock<Memory> = LazyLock::new(|| memory("w1"));
static W2: LazyLock<Memory> = LazyLock::new(|| memory("w2"));
/// W2 again with `Memory::durable(true)` (an `fsync` per entry, as `cached` 4.x's redb commits).
static W2_DURABLE: LazyLock<Memory> = LazyLock::new(|| memory("w2-durable").durable(true));
static W4: LazyLock<Memory> = LazyLock::new(|| memory("w4"));
static W5: LazyLock<Memory> = LazyLock::new(|| memory("w5"));
static W6: LazyLock<Memory> = LazyLock::new(|| memory("w6"));

/// How many times each body ran.
static SQUARES: AtomicU64 = AtomicU64::new(0);
static TOTALS: AtomicU64 = AtomicU64::new(0);
static MAKES: AtomicU64 = AtomicU64::new(0);
static SPINS: AtomicU64 = AtomicU64::new(0);

fn square(x: u64) -> u64 {
    SQUARES.fetch_add(1, Ordering::SeqCst);
    x * x
}

fn total(a: &[f64]) -> f64 {
    TOTALS.fetch_add(1, Ordering::SeqCst);
    a.iter().sum()
}

fn make(n: u64) -> Vec<f64> {
    MAKES.fetch_add(1, Ordering::SeqCst);
    (0..n).map(|i| i as f64).collect()
}

/// `ITERS`, calibrated so that `spin` costs about 1 ms.
static ITERS: OnceLock<u64> = OnceLock::new();

// Never inlined: the timed item cost and the cached body run the same machine code (inlined, the
// loop is compiled once per caller, and its speed differs by a few percent between the copies).
#[inline(never)]
fn spin_raw(i: u64, iters: u64) -> u64 {
    let mut s = 0u64;
    for k in 0..iters {
        s = (s * 31 + k + i) % 1_000_003;
    }
    s
}

fn spin(i: u64) -> u64 {
    SPINS.fetch_add(1, Ordering::SeqCst);
    spin_raw(i, *ITERS.get().expect("calibrated"))
}

#[cached(memory = W1)]
fn square_w1(x: u64) -> u64 {
    square(x)
}

#[cached(memory = W2)]
fn square_w2(x: u64) -> u64 {
    square(x)
}

#[cached(memory = W2_DURABLE)]
fn square_w2_durable(x: u64) -> u64 {
    square(x)
}

/// W3 runs in child processes, on the cache `MEMO_DIR` names.
#[cached]
fn square_w3(x: u64) -> u64 {
    square(x)
}

#[cached(memory = W4)]
fn total_w4(a: &[f64]) -> f64 {
    total(a)
}

#[cached(memory = W5)]
fn make_w5(n: u64) -> Vec<f64> {
    make(n)
}

/// W5 through memo's fast path for large numeric arrays: the same values as a `memo::Array`,
/// which a hit reads from the mapped entry file (reported as extra rows).
#[cached(memory = W5)]
fn make_w5_array(n: u64) -> memo::Array<f64> {
    make(n).into()
}

#[cached(memory = W6)]
fn spin_w6(i: u64) -> u64 {
    spin(i)
}

fn emit(workload: &str, metric: &str, value: f64, unit: &str) {
    let line = serde_json::json!({
        "system": SYSTEM,
        "workload": workload,
        "metric": metric,
        "value": (value * 1000.0).round() / 1000.0,
        "unit": unit,
    });
    println!("{line}");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `f`, checking that the body counted by `counter` ran exactly `expected` times.
fn expect_runs<T>(counter: &AtomicU64, expected: u64, what: &str, f: impl FnOnce() -> T) -> T {
    let before = counter.load(Ordering::SeqCst);
    let value = f();
    let ran = counter.load(Ordering::SeqCst) - before;
    assert_eq!(
        ran, expected,
        "{what}: the body ran {ran} times, expected {expected}"
    );
    value
}

fn w1() {
    for x in 0..1000 {
        square_w1(x);
    }
    let per_call: Vec<f64> = (0..REPS)
        .map(|_| {
            let (sum, took) = expect_runs(&SQUARES, 0, "W1 hits", || {
                let start = Instant::now();
                let sum: u64 = (0..100_000u64)
                    .map(|i| square_w1(black_box(i % 1000)))
                    .sum();
                (sum, start.elapsed())
            });
            assert_eq!(sum, 100 * 332_833_500);
            took.as_nanos() as f64 / 100_000.0
        })
        .collect();
    emit("W1 small-hit", "per_call", median(per_call), "ns");
}

/// Per-call nanoseconds of 1,000 misses of `f` on new keys (each checked to run the body once),
/// median of `REPS`.
fn misses(f: fn(u64) -> u64, what: &str) -> f64 {
    let per_call: Vec<f64> = (0..REPS as u64)
        .map(|r| {
            expect_runs(&SQUARES, 1000, what, || {
                let start = Instant::now();
                for i in 0..1000 {
                    let x = 1_000_000 * (r + 1) + i;
                    assert_eq!(f(black_box(x)), x * x);
                }
                start.elapsed().as_nanos() as f64 / 1000.0
            })
        })
        .collect();
    median(per_call)
}

fn w2() {
    let per_call = misses(square_w2, "W2 misses");
    emit("W2 small-miss", "per_call", per_call, "ns");
    let per_call = misses(square_w2_durable, "W2 durable misses");
    emit("W2 small-miss", "per_call_durable", per_call, "ns");
}

/// W3's child processes: `w3-warm DIR` stores 1,000 values, `w3-hit DIR` reads them back.
fn w3_child(mode: &str, dir: &str) {
    if mode == "w3-empty" {
        // The floor: this process, started and ended without touching the cache.
        println!("0");
        return;
    }
    // Read once, at the first call: set before it.
    std::env::set_var("MEMO_DIR", dir);
    std::env::remove_var("MEMO_DISABLE");
    let expected_runs = if mode == "w3-warm" { 1000 } else { 0 };
    let took = expect_runs(&SQUARES, expected_runs, mode, || {
        let start = Instant::now();
        for x in 0..1000 {
            assert_eq!(square_w3(black_box(x)), x * x);
        }
        start.elapsed()
    });
    println!("{}", took.as_nanos() as f64 / 1000.0);
}

fn w3() {
    let dir = ROOT.join("w3");
    let me = std::env::current_exe().expect("runner path");
    let child = |mode: &str| -> (Duration, String) {
        let start = Instant::now();
        let output = Command::new(&me)
            .args([mode, dir.to_str().expect("UTF-8 path")])
            .output()
            .expect("child process");
        let took = start.elapsed();
        assert!(
            output.status.success(),
            "{mode} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        (
            took,
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        )
    };
    child("w3-warm");
    let (mut walls, mut per_call, mut empty) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let (wall, printed) = child("w3-hit");
        walls.push(wall.as_secs_f64() * 1e3);
        per_call.push(printed.parse::<f64>().expect("per-call time"));
        // Not a W3 figure: the same process doing nothing, right after each hit process (in
        // the same state of the machine), for what starting a process costs here.
        empty.push(child("w3-empty").0.as_secs_f64() * 1e3);
    }
    emit("W3 cold-process-hit", "process_wall", median(walls), "ms");
    emit("W3 cold-process-hit", "per_call", median(per_call), "ns");
    emit(
        "W3 cold-process-hit",
        "process_wall_empty",
        median(empty),
        "ms",
    );
}

const BIG: u64 = 12_500_000;

fn w4() {
    let a: Vec<f64> = (0..BIG).map(|i| i as f64).collect();
    let expected = expect_runs(&TOTALS, 1, "W4 miss", || total_w4(&a));
    let times: Vec<f64> = (0..REPS)
        .map(|_| {
            expect_runs(&TOTALS, 0, "W4 hit", || {
                let start = Instant::now();
                let value = total_w4(black_box(&a));
                let took = start.elapsed().as_secs_f64();
                assert_eq!(value, expected);
                took
            })
        })
        .collect();
    let secs = median(times);
    emit("W4 big-arg-hit", "per_call", secs * 1e3, "ms");
    emit("W4 big-arg-hit", "throughput", 1e8 / secs / 1e9, "GB/s");
}

fn w5() {
    expect_runs(&MAKES, 1, "W5 miss", || make_w5(BIG));
    let times: Vec<f64> = (0..REPS)
        .map(|_| {
            expect_runs(&MAKES, 0, "W5 hit", || {
                let start = Instant::now();
                let value = make_w5(black_box(BIG));
                let took = start.elapsed().as_secs_f64();
                assert_eq!(value.len() as u64, BIG);
                assert_eq!(value[value.len() - 1], (BIG - 1) as f64);
                drop(value); // freed outside the timed region
                took
            })
        })
        .collect();
    let secs = median(times);
    emit("W5 big-result-hit", "per_call", secs * 1e3, "ms");
    emit("W5 big-result-hit", "throughput", 1e8 / secs / 1e9, "GB/s");

    expect_runs(&MAKES, 1, "W5 array miss", || make_w5_array(BIG));
    let times: Vec<f64> = (0..REPS)
        .map(|_| {
            expect_runs(&MAKES, 0, "W5 array hit", || {
                let start = Instant::now();
                let value = make_w5_array(black_box(BIG));
                let took = start.elapsed().as_secs_f64();
                assert_eq!(value.len() as u64, BIG);
                assert_eq!(value[value.len() - 1], (BIG - 1) as f64);
                assert!(value.is_mapped());
                drop(value);
                took
            })
        })
        .collect();
    let secs = median(times);
    emit("W5 big-result-hit", "per_call_array", secs * 1e3, "ms");
    emit(
        "W5 big-result-hit",
        "throughput_array",
        1e8 / secs / 1e9,
        "GB/s",
    );
}

/// Doubles `ITERS` from 1,000 until the fastest of 3 timings of `spin(0)` reaches 20 ms, then
/// scales it to about 1 ms.
fn calibrate() -> u64 {
    let mut n = 1_000u64;
    loop {
        let fastest = (0..3)
            .map(|_| {
                let start = Instant::now();
                black_box(spin_raw(black_box(0), n));
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        if fastest >= 0.020 {
            return (n as f64 * 0.001 / fastest).round() as u64;
        }
        n *= 2;
    }
}

fn w6() {
    ITERS.get_or_init(calibrate);
    let start = Instant::now();
    for i in 0..200 {
        black_box(spin(i));
    }
    let item_cost = start.elapsed().as_secs_f64() * 1e3 / 200.0;
    let ideal = 2000.0 * item_cost / 2.0;
    let start = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let pool_start = start.elapsed().as_secs_f64() * 1e3;
    let (mut cold, mut warm, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..REPS as u64 {
        let items: Vec<u64> = (0..2000).map(|i| r * 1_000_000 + i).collect();
        let map = || -> Vec<u64> {
            pool.install(|| items.iter().copied().par_cached_map(spin_w6).collect())
        };
        let (first, took) = expect_runs(&SPINS, 2000, "W6 cold", || {
            let start = Instant::now();
            let results = map();
            (results, start.elapsed())
        });
        cold.push(took.as_secs_f64() * 1e3);
        let (again, took) = expect_runs(&SPINS, 0, "W6 warm", || {
            let start = Instant::now();
            let results = map();
            (results, start.elapsed())
        });
        warm.push(took.as_secs_f64() * 1e3);
        assert_eq!(first, again);
        // Not a W6 figure: the same items through rayon without memo, for what running 2 threads
        // costs on this machine beside the ideal.
        let iters = *ITERS.get().expect("calibrated");
        let start = Instant::now();
        let uncached: Vec<u64> =
            pool.install(|| items.par_iter().map(|&i| spin_raw(i, iters)).collect());
        plain.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(first, uncached);
        let iters = *ITERS.get().expect("calibrated");
        assert_eq!(first[7], spin_raw(items[7], iters));
    }
    emit("W6 par-map", "item_cost", item_cost, "ms");
    emit("W6 par-map", "ideal", ideal, "ms");
    emit("W6 par-map", "pool_start", pool_start, "ms");
    emit("W6 par-map", "cold_wall", median(cold), "ms");
    emit("W6 par-map", "warm_wall", median(warm), "ms");
    emit("W6 par-map", "cold_wall_plain_rayon", median(plain), "ms");
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let [mode, dir] = args.as_slice() {
        if mode.starts_with("w3-") {
            w3_child(mode, dir);
            return;
        }
    }
    let _cleanup = common::RemoveOnDrop(ROOT.clone());
    let wanted: Vec<String> = args.iter().map(|a| a.to_uppercase()).collect();
    let runs = |id: &str| wanted.is_empty() || wanted.iter().any(|w| w == id);
    // The global rayon pool is limited to 2 threads too, as the harness does.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    let workloads: [(&str, fn()); 6] = [
        ("W1", w1),
        ("W2", w2),
        ("W3", w3),
        ("W4", w4),
        ("W5", w5),
        ("W6", w6),
    ];
    for (id, workload) in workloads {
        if runs(id) {
            eprintln!("memo: {id}");
            workload();
        }
    }
}
