use memo::prelude::*;
use std::sync::LazyLock;
static M: LazyLock<Memory> = LazyLock::new(|| Memory::new(std::env::args().nth(1).unwrap()));
#[cached(memory = M)]
fn sq(x: u64) -> u64 {
    x * x
}
fn main() {
    let n: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    let start = std::time::Instant::now();
    let mut s = 0u64;
    for i in 0..n {
        s = s.wrapping_add(sq(std::hint::black_box(i + 1_000_000_000)));
    }
    let t = start.elapsed();
    println!("{} ns/call {}", t.as_nanos() as f64 / n as f64, s);
}
