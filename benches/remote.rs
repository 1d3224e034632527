//! Hit and miss latency through an S3 server: `cargo bench --features remote --bench remote`.
//!
//! Starts a moto server on loopback (found or installed as the tests do), then times, per call,
//! on machines that each have a local folder of their own (all without the in-process memory
//! tier, so every hit reads storage):
//!
//! - `miss_store`: a miss computed and stored through the server (lease taken and released, entry
//!   written locally and with a conditional create remotely);
//! - `remote_hit`: a hit on a machine that does not have the entry yet (local miss, one GET,
//!   kept locally);
//! - `local_hit`: the same hit again, now from the machine's local folder;
//! - `local_only_miss_store`: a miss on a cache with no remote store, for comparison.
//!
//! Prints one JSON line per figure (`"system": "memo"`), medians and 90th percentiles in µs.
//! The server is moto (Python): its own request handling dominates the remote figures; a real
//! S3 endpoint in the same region answers in single-digit milliseconds per request.

#[path = "../tests/common/moto.rs"]
mod moto;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use memo::prelude::*;
use memo::AsMemory;
use moto::Moto;

/// Calls per figure.
const CALLS: u64 = 300;
/// Machines that read what the first one stored.
const READERS: usize = 3;

/// Several machines in one process: the cached function uses the one `CURRENT` selects.
struct Machines {
    memories: OnceLock<Vec<Memory>>,
    current: AtomicUsize,
}

impl AsMemory for Machines {
    fn as_memory(&self) -> &Memory {
        let memories = self.memories.get().expect("machines set up");
        &memories[self.current.load(Ordering::Relaxed)]
    }
}

static MACHINES: Machines = Machines {
    memories: OnceLock::new(),
    current: AtomicUsize::new(0),
};

#[cached(memory = MACHINES)]
fn payload(x: u64) -> Vec<u64> {
    (x..x + 16).collect()
}

fn time_calls(machine: usize, keys: std::ops::Range<u64>) -> Vec<f64> {
    MACHINES.current.store(machine, Ordering::Relaxed);
    keys.map(|x| {
        let started = Instant::now();
        let value = payload(x);
        let spent = started.elapsed();
        assert_eq!(value[0], x);
        spent.as_secs_f64() * 1e6
    })
    .collect()
}

fn report(metric: &str, mut micros: Vec<f64>) {
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    println!(
        "{{\"system\": \"memo\", \"workload\": \"remote\", \"metric\": \"{metric}\", \"unit\": \"us\", \"median\": {:.1}, \"p90\": {:.1}, \"calls\": {}}}",
        at(0.5),
        at(0.9),
        micros.len()
    );
}

fn main() {
    let moto = Moto::start();
    let root = tempfile::tempdir().unwrap();
    let remote = |name: &str| {
        moto.config("bench")
            .local_dir(root.path().join(name))
            .build()
            .unwrap()
            .memory_tier(0)
    };
    let mut memories = vec![remote("writer")];
    memories.extend((0..READERS).map(|i| remote(&format!("reader{i}"))));
    memories.push(Memory::new(root.path().join("local-only")).memory_tier(0));
    let local_only = memories.len() - 1;
    assert!(MACHINES.memories.set(memories).is_ok());

    // Warm-up: the function's source is recorded, connections are opened.
    time_calls(0, 1_000_000..1_000_010);
    time_calls(local_only, 1_000_000..1_000_010);

    report("miss_store", time_calls(0, 0..CALLS));
    let mut remote_hits = Vec::new();
    let mut local_hits = Vec::new();
    for reader in 1..=READERS {
        remote_hits.extend(time_calls(reader, 0..CALLS / READERS as u64));
        local_hits.extend(time_calls(reader, 0..CALLS / READERS as u64));
    }
    report("remote_hit", remote_hits);
    report("local_hit", local_hits);
    report("local_only_miss_store", time_calls(local_only, 0..CALLS));
    let stats = MACHINES.memories.get().unwrap()[1].stats();
    assert_eq!(stats.misses, 0, "readers only hit");
    drop(moto);
}
