use memo::prelude::*;
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::LazyLock;
use std::time::Instant;
static M: LazyLock<Memory> = LazyLock::new(|| Memory::new(std::env::args().nth(1).unwrap()));
static ITERS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
fn raw(i: u64) -> u64 {
    let mut s = 0u64;
    for k in 0..*ITERS.get().unwrap() {
        s = (s * 31 + k + i) % 1_000_003;
    }
    s
}
#[cached(memory = M)]
fn spin(i: u64) -> u64 {
    raw(i)
}
fn main() {
    // calibrate ~1ms
    let mut iters = 100_000u64;
    ITERS.set(iters).ok();
    let t = Instant::now();
    black_box(raw(1));
    let per = t.elapsed().as_secs_f64() / iters as f64;
    iters = (0.001 / per) as u64;
    static I2: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let _ = I2;
    let iters_cell = &ITERS;
    let _ = iters_cell; // can't reset OnceLock; use env instead
    let iters: u64 = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(iters);
    let _ = iters;
    let t = Instant::now();
    for i in 0..200 {
        black_box(raw(i));
    }
    let item = t.elapsed().as_secs_f64() * 1e3 / 200.0;
    let ideal = 2000.0 * item / 2.0;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for r in 0..5u64 {
        let items: Vec<u64> = (0..2000).map(|i| r * 1_000_000 + i).collect();
        let t = Instant::now();
        let a: Vec<u64> = pool.install(|| items.par_iter().map(|&i| raw(i)).collect());
        let plain = t.elapsed().as_secs_f64() * 1e3;
        let items2: Vec<u64> = (0..2000).map(|i| 100_000_000 + r * 1_000_000 + i).collect();
        let t = Instant::now();
        let b: Vec<u64> = pool.install(|| items2.iter().copied().par_cached_map(spin).collect());
        let cached = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let c: Vec<u64> = pool.install(|| {
            items
                .par_iter()
                .with_max_len(1)
                .map(|&i| raw(i + 7))
                .collect()
        });
        let ml1 = t.elapsed().as_secs_f64() * 1e3;
        black_box((a, b, c));
        println!("maxlen1 {:.3}x", ml1 / ideal);
        println!(
            "item {item:.3} ideal {ideal:.1} plain {plain:.1} ({:.3}x) cached {cached:.1} ({:.3}x)",
            plain / ideal,
            cached / ideal
        );
    }
}
