//! The original tutorial notebook, replayed in Rust.
//!
//! ```sh
//! cargo run --example tutorial      # first run: about 6 s (1 s parallel map, 5 s cached call)
//! cargo run --example tutorial      # second run: instant, everything is served from the cache
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

/// The notebook's slow function for the parallel map: one second per problem.
#[cached]
fn g(x: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(1));
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

    // 2. Parallel map: 8 problems of one second each on 8 threads (`multiprocessing.Pool` in the
    //    notebook). Each result is cached as it finishes: the next run takes no time at all.
    println!("\n## parallel map");
    let start = Instant::now();
    let squares: Vec<u64> = problems.par_cached_map(g).jobs(8).collect();
    println!(
        "executed {} problems in {} seconds: {squares:?}",
        problems.len(),
        start.elapsed().as_secs()
    );

    // MapReduce: map in parallel, then reduce the results.
    let total: u64 = problems.par_cached_map(g).jobs(8).into_iter().sum();
    println!("sum of the squares = {total}");

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
