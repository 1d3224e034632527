//! The original tutorial notebook, replayed in Rust.
//!
//! ```sh
//! cargo run --example tutorial      # first run: about 5 s (one computation is cached)
//! cargo run --example tutorial      # second run: instant, served from the cache
//! ```
//!
//! The cache lives in `MEMO_DIR` when it is set, else in the user's cache folder
//! (`~/.cache/memo` on Linux); see the README.

use std::time::{Duration, Instant};

use memo::prelude::*;

/// The notebook's first function.
fn f(x: u64) -> u64 {
    x * x
}

/// The notebook's `joblib.Memory` example: an expensive function, cached on disk.
#[cached]
fn my_cached_function(x: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(5));
    x * x
}

fn main() {
    // 1. map: apply `f` to every problem.
    println!("## map");
    let problems: Vec<u64> = (0..8).collect();
    let results: Vec<u64> = problems.iter().map(|&x| f(x)).collect();
    for (x, y) in problems.iter().zip(&results) {
        println!("f({x}) = {y}");
    }

    // 2. Parallel map and MapReduce: see the parallel-map section (coming with `par_cached_map`).

    // 3. Caching: the first call computes (5 s), the repeats are served from disk; the next run
    //    of this program is served from disk too.
    println!("\n## caching");
    for _ in 0..4 {
        let start = Instant::now();
        let value = my_cached_function(2);
        println!("my_cached_function(2) = {value}  ({:.1?})", start.elapsed());
    }
    if let Some(location) = my_cached_function::location() {
        println!("stored in {}", location.display());
    }
}
