//! One cache shared by many "machines" through a real S3 server on loopback: moto
//! (`tests/common/moto.rs` finds or installs it; `.ci/run` installs it), started by each test on a port
//! of its own and stopped when the test ends. Each machine is a child process (this test binary
//! running `child_machine`) with a local folder of its own, so the only thing they share is the
//! server: what one computed, the others read from it.

#![cfg(feature = "remote")]

mod common;
#[path = "common/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use common::{append_line, child_test, entry_files, fresh_dir, inspector, stored_keys};
use memo::prelude::*;
use memo::AsMemory;
use moto::{Moto, BUCKET};

/// What the child computes and where it counts: set by the parent.
const KEYS: &str = "MEMO_TEST_KEYS";
const COUNTER: &str = "MEMO_TEST_COUNTER";
const SLEEP_MS: &str = "MEMO_TEST_SLEEP_MS";
const STRICT: &str = "MEMO_TEST_STRICT";
/// Makes the child return wrong values: an attacker planting results.
const WRONG: &str = "MEMO_TEST_WRONG";

/// The cache of the child: the environment's, strict when asked.
static CHILD_MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    let memory = Memory::from_env();
    let strict = std::env::var_os(STRICT).is_some();
    memory.strict(strict)
});

#[cached(memory = CHILD_MEMORY)]
fn square_slowly(x: u64) -> u64 {
    if let Some(counter) = std::env::var_os(COUNTER) {
        append_line(Path::new(&counter), &format!("computed {x}"));
    }
    let sleep: u64 = std::env::var(SLEEP_MS)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(sleep));
    if std::env::var_os(WRONG).is_some() {
        return x * x + 1;
    }
    x * x
}

/// Values expire after 2 s.
#[cached(memory = CHILD_MEMORY, expire = "2s")]
fn square_expiring(x: u64) -> u64 {
    if let Some(counter) = std::env::var_os(COUNTER) {
        append_line(Path::new(&counter), &format!("computed {x}"));
    }
    x * x
}

/// Which function the child calls: `square_slowly`, or `square_expiring` when set.
const EXPIRING: &str = "MEMO_TEST_EXPIRING";

/// Not a test of its own: one machine, run by the tests below as a child process. Prints one
/// `value x=y` line per key of `MEMO_TEST_KEYS` (comma-separated).
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_machine() {
    let keys = std::env::var(KEYS).expect("keys");
    for key in keys.split(',').filter(|k| !k.is_empty()) {
        let x: u64 = key.parse().unwrap();
        let y = if std::env::var_os(EXPIRING).is_some() {
            square_expiring(x)
        } else {
            square_slowly(x)
        };
        println!("value {x}={y}");
    }
    let stats = CHILD_MEMORY.stats();
    println!("misses={} hits={}", stats.misses, stats.hits);
}

/// Not a test of its own: one job of a job array (with `MEMO_SHARD`) or the gather step
/// (without), mapping `square_slowly` over the keys with `.par_cached_map`.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_mapper() {
    let keys: Vec<u64> = std::env::var(KEYS)
        .expect("keys")
        .split(',')
        .map(|k| k.parse().unwrap())
        .collect();
    match keys.par_cached_map(square_slowly).try_collect() {
        Ok(values) => {
            for (x, y) in keys.iter().zip(values) {
                println!("value {x}={y}");
            }
        }
        Err(error) if error.awaits_other_shards() => println!("share done: {error}"),
        Err(error) => panic!("{error}"),
    }
    let stats = CHILD_MEMORY.stats();
    println!("misses={} hits={}", stats.misses, stats.hits);
}

/// A machine: its own local folder, the shared server and prefix.
struct Machine<'a> {
    endpoint: String,
    prefix: &'a str,
    local: PathBuf,
    counter: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl<'a> Machine<'a> {
    fn new(moto: &Moto, prefix: &'a str, dir: &Path, name: &str) -> Self {
        Machine::at(moto.endpoint(), prefix, dir, name)
    }

    /// A machine whose S3 endpoint is `endpoint`.
    fn at(endpoint: String, prefix: &'a str, dir: &Path, name: &str) -> Self {
        Machine {
            endpoint,
            prefix,
            local: dir.join(name),
            counter: dir.join("counter"),
            env: Vec::new(),
        }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.env.push((name, value.into()));
        self
    }

    fn command(&self, keys: &[u64]) -> Command {
        self.command_of("child_machine", keys)
    }

    fn command_of(&self, child: &str, keys: &[u64]) -> Command {
        let mut command = child_test(child);
        let keys: Vec<String> = keys.iter().map(u64::to_string).collect();
        command
            .env("MEMO_DIR", format!("s3://{BUCKET}/{}", self.prefix))
            .env("MEMO_LOCAL_DIR", &self.local)
            .env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("MEMO_SECRET")
            .env_remove("MEMO_SHARD")
            .env(KEYS, keys.join(","))
            .env(COUNTER, &self.counter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    fn run(&self, keys: &[u64]) -> Output {
        let output = self.command(keys).output().unwrap();
        assert!(
            output.status.success(),
            "machine failed:\n{}",
            text(&output)
        );
        output
    }

    fn spawn(&self, keys: &[u64]) -> Child {
        self.command(keys).spawn().unwrap()
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The `value x=y` lines of a machine's output.
fn values(output: &Output) -> BTreeMap<u64, u64> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (x, y) = line.strip_prefix("value ")?.split_once('=')?;
            Some((x.parse().ok()?, y.parse().ok()?))
        })
        .collect()
}

fn right(keys: &[u64]) -> BTreeMap<u64, u64> {
    keys.iter().map(|&x| (x, x * x)).collect()
}

/// How many times each key was computed, by all machines.
fn computations(counter: &Path) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(counter).unwrap_or_default().lines() {
        let x: u64 = line.strip_prefix("computed ").unwrap().parse().unwrap();
        *counts.entry(x).or_default() += 1;
    }
    counts
}

#[test]
fn machines_compute_each_key_once_and_share_the_results() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-once");
    let keys: Vec<u64> = (0..8).collect();
    // Four machines at once, each asking for every key, in different orders.
    let children: Vec<(Child, Machine)> = (0..4)
        .map(|m| {
            let machine = Machine::new(&moto, "once", &dir, &format!("m{m}"))
                .with(SLEEP_MS, "150")
                .with("MEMO_LEASE", "5");
            let mut order = keys.clone();
            order.rotate_left(m * 2);
            (machine.spawn(&order), machine)
        })
        .collect();
    for (child, _) in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
        assert_eq!(values(&output), right(&keys), "{}", text(&output));
    }
    let counts = computations(&dir.join("counter"));
    assert_eq!(
        counts,
        keys.iter().map(|&k| (k, 1)).collect(),
        "every key computed exactly once over all machines"
    );
    // A new machine computes nothing: every value comes from the server, and is then kept in its
    // local folder.
    let late = Machine::new(&moto, "once", &dir, "late");
    let output = late.run(&keys);
    assert_eq!(values(&output), right(&keys));
    assert!(
        text(&output).contains("misses=0 hits=8"),
        "{}",
        text(&output)
    );
    assert_eq!(stored_keys(&late.local).len(), keys.len());
    assert_eq!(
        computations(&dir.join("counter")).values().sum::<usize>(),
        8
    );
}

#[test]
fn a_lease_is_renewed_while_its_holder_computes() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-renewed");
    // The holder computes for 3 s with a 0.6 s lease: only renewals keep the lease.
    let holder = Machine::new(&moto, "renewed", &dir, "holder")
        .with(SLEEP_MS, "3000")
        .with("MEMO_LEASE", "0.6");
    let first = holder.spawn(&[7]);
    wait_for_computations(&dir.join("counter"), 1);
    let waiter = Machine::new(&moto, "renewed", &dir, "waiter").with("MEMO_LEASE", "0.6");
    let output = waiter.run(&[7]);
    assert_eq!(values(&output), right(&[7]));
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(
        computations(&dir.join("counter")),
        BTreeMap::from([(7, 1)]),
        "the waiter must wait for the value, not take the lease over"
    );
}

#[test]
fn the_lease_of_a_killed_machine_is_taken_over_after_it_expires() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-killed");
    let doomed = Machine::new(&moto, "killed", &dir, "doomed")
        .with(SLEEP_MS, "600000")
        .with("MEMO_LEASE", "1");
    let mut child = doomed.spawn(&[9]);
    wait_for_computations(&dir.join("counter"), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    let survivor = Machine::new(&moto, "killed", &dir, "survivor").with("MEMO_LEASE", "1");
    let output = survivor.run(&[9]);
    assert_eq!(values(&output), right(&[9]));
    assert_eq!(computations(&dir.join("counter")), BTreeMap::from([(9, 2)]));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}: the expired lease must not block the key",
        started.elapsed()
    );
}

#[test]
fn a_server_stopped_mid_run_leaves_the_program_finishing_with_right_values() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-stopped");
    let keys: Vec<u64> = (0..10).collect();
    let machine = Machine::new(&moto, "stopped", &dir, "m").with(SLEEP_MS, "200");
    let child = machine.spawn(&keys);
    wait_for_computations(&dir.join("counter"), 3);
    moto.stop();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(values(&output), right(&keys));
    assert!(
        text(&output).contains("caching in the local folder only"),
        "one warning says the remote store is gone:\n{}",
        text(&output)
    );
    // What was computed is in the local folder.
    assert_eq!(stored_keys(&machine.local).len(), keys.len());
}

#[test]
fn strict_mode_makes_an_unreachable_server_an_error() {
    let moto = Moto::start();
    moto.stop();
    let dir = fresh_dir("remote-strict");
    let machine = Machine::new(&moto, "strict", &dir, "m").with(STRICT, "1");
    let output = machine.command(&[3]).output().unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("the remote cache s3://memo-test/strict"),
        "{}",
        text(&output)
    );
    // Without strict mode the same machine computes, with a warning.
    let lenient = Machine::new(&moto, "strict", &dir, "lenient");
    let output = lenient.run(&[3]);
    assert_eq!(values(&output), right(&[3]));
    assert!(text(&output).contains("caching in the local folder only"));
}

#[test]
fn a_secret_keeps_results_planted_without_it_out() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-secret");
    // Someone with write access but no secret stores wrong values.
    let attacker = Machine::new(&moto, "secret", &dir, "attacker").with(WRONG, "1");
    assert_eq!(
        values(&attacker.run(&[4, 5])),
        BTreeMap::from([(4, 17), (5, 26)])
    );
    // A machine with the secret does not use them: it computes the right ones and replaces them.
    let first = Machine::new(&moto, "secret", &dir, "first").with("MEMO_SECRET", "s3cr3t");
    let output = first.run(&[4, 5]);
    assert_eq!(values(&output), right(&[4, 5]));
    assert!(text(&output).contains("MAC"), "{}", text(&output));
    assert_eq!(
        computations(&dir.join("counter")),
        BTreeMap::from([(4, 2), (5, 2)])
    );
    // Another machine with the secret reads those from the server.
    let second = Machine::new(&moto, "secret", &dir, "second").with("MEMO_SECRET", "s3cr3t");
    let output = second.run(&[4, 5]);
    assert_eq!(values(&output), right(&[4, 5]));
    assert!(text(&output).contains("misses=0"), "{}", text(&output));
    // One with another secret does not.
    let other = Machine::new(&moto, "secret", &dir, "other").with("MEMO_SECRET", "other");
    let output = other.run(&[4]);
    assert_eq!(values(&output), right(&[4]));
    assert!(text(&output).contains("misses=1"), "{}", text(&output));
}

/// Runs the inspector on the server's `prefix` and parses its `--json` output.
fn inspect(moto: &Moto, prefix: &str, args: &[&str]) -> serde_json::Value {
    let output = Command::new(inspector())
        .args(args)
        .args(["--dir", &format!("s3://{BUCKET}/{prefix}"), "--json"])
        .env_remove("MEMO_DIR")
        .env("MEMO_LOCAL_DIR", fresh_dir("remote-inspector"))
        .env("AWS_ENDPOINT", moto.endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "inspect {args:?}:\n{}",
        text(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)))
}

/// Overwrites an object on the server with other bytes, with a signed PUT by boto3 (which
/// `moto[server]` depends on).
fn overwrite_object(moto: &Moto, url: &str, bytes: &[u8]) {
    let (bucket, key) = url.strip_prefix("s3://").unwrap().split_once('/').unwrap();
    let script = "import sys, boto3\n\
        s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', \
        aws_secret_access_key='test', region_name='us-east-1')\n\
        s3.put_object(Bucket=sys.argv[2], Key=sys.argv[3], Body=sys.stdin.buffer.read())\n";
    let mut child = Command::new(moto::python())
        .args(["-c", script, &moto.endpoint(), bucket, key])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    assert!(child.wait().unwrap().success(), "boto3 put_object failed");
}

#[test]
fn the_inspector_lists_verifies_and_evicts_a_remote_cache() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-inspect");
    let machine = Machine::new(&moto, "insp", &dir, "m");
    machine.run(&[1, 2, 3, 4]);

    let ls = inspect(&moto, "insp", &["ls"]);
    let functions = ls.as_array().unwrap();
    assert_eq!(functions.len(), 1, "{ls}");
    assert!(functions[0]["name"]
        .as_str()
        .unwrap()
        .ends_with("remote.square_slowly"));
    assert_eq!(functions[0]["versions"][0]["entries"], 4);
    assert!(
        functions[0]["versions"][0]["full_version"].is_string(),
        "{ls}"
    );

    let stats = inspect(&moto, "insp", &["stats"]);
    assert_eq!(stats["entries"], 4);
    assert_eq!(stats["cache"], format!("s3://{BUCKET}/insp"));

    let show = inspect(&moto, "insp", &["show", "square_slowly"]);
    let entries = show["latest_entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    assert!(entries.iter().all(|e| e["readable"] == true), "{show}");

    // A damaged object on the server: reported, removed, recomputed by the next machine.
    let damaged = entries[0]["path"].as_str().unwrap().to_owned();
    overwrite_object(&moto, &damaged, b"not an entry at all, but long enough to be looked at: ........................................");
    let verify = inspect(&moto, "insp", &["verify"]);
    assert_eq!(verify["valid"], 3, "{verify}");
    assert_eq!(verify["broken"][0]["path"], damaged.as_str());
    assert_eq!(inspect(&moto, "insp", &["verify", "--fix"])["removed"], 1);
    assert_eq!(inspect(&moto, "insp", &["verify"])["valid"], 3);
    let fresh = Machine::new(&moto, "insp", &dir, "fresh");
    let output = fresh.run(&[1, 2, 3, 4]);
    assert_eq!(values(&output), right(&[1, 2, 3, 4]));
    assert!(
        text(&output).contains("misses=1 hits=3"),
        "{}",
        text(&output)
    );

    // Eviction on the server, then clearing it.
    let gc = inspect(&moto, "insp", &["gc", "--max-items", "2"]);
    assert_eq!(gc["kept_entries"], 2, "{gc}");
    assert_eq!(inspect(&moto, "insp", &["stats"])["entries"], 2);
    inspect(&moto, "insp", &["clear", "--yes"]);
    assert_eq!(inspect(&moto, "insp", &["stats"])["entries"], 0);
}

#[test]
fn shards_of_a_job_array_on_four_machines_then_a_gather_compute_each_item_once() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-shards");
    let keys: Vec<u64> = (0..40).collect();
    // One job after the other, so that only the shards split the work (running together, the
    // leases alone would too).
    let mut shares = Vec::new();
    for i in 1..=4 {
        let counter = dir.join(format!("counter{i}"));
        let job = Machine::new(&moto, "shards", &dir, &format!("job{i}"))
            .with("MEMO_SHARD", format!("{i}/4"))
            .with(COUNTER, counter.display().to_string());
        let output = job.command_of("child_mapper", &keys).output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
        if i < 4 {
            assert!(text(&output).contains("share done"), "{}", text(&output));
        } else {
            // The last job finds the other shares on the server and returns everything.
            assert_eq!(values(&output), right(&keys), "{}", text(&output));
        }
        shares.push(computations(&counter));
    }
    let mut all = BTreeMap::new();
    for share in &shares {
        assert!(
            !share.is_empty() && share.len() < 25,
            "each job computes its share only: {shares:?}"
        );
        for (&key, &n) in share {
            *all.entry(key).or_insert(0) += n;
        }
    }
    assert_eq!(
        all,
        keys.iter().map(|&k| (k, 1)).collect(),
        "every item computed exactly once by the four jobs"
    );
    // The gather step, on a fifth machine: every value from the server, nothing computed.
    let gather = Machine::new(&moto, "shards", &dir, "gather");
    let output = gather.command_of("child_mapper", &keys).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(values(&output), right(&keys));
    assert!(text(&output).contains("misses=0"), "{}", text(&output));
}

#[test]
fn a_server_that_never_answers_times_out_and_the_program_goes_on() {
    // Accepts connections and never answers, until the test ends.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut open = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((stream, _)) = listener.accept() {
                    open.push(stream);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let dir = fresh_dir("remote-silent");
    let machine = Machine::at(endpoint, "silent", &dir, "m").with("MEMO_REMOTE_TIMEOUT", "1");
    let started = Instant::now();
    let output = machine.run(&[2, 3, 4]);
    let spent = started.elapsed();
    done.store(true, Ordering::Relaxed);
    held.join().unwrap();
    assert_eq!(values(&output), right(&[2, 3, 4]));
    let shown = text(&output);
    assert!(
        shown.contains("caching in the local folder only"),
        "{shown}"
    );
    assert_eq!(
        shown.matches("caching in the local folder only").count(),
        1,
        "one warning per outage: {shown}"
    );
    assert!(
        spent < Duration::from_secs(60),
        "the time limit bounds the wait: {spent:?}"
    );
}

/// A cache made at run time (the server's port is known only then).
struct Late(OnceLock<Memory>);

impl AsMemory for Late {
    fn as_memory(&self) -> &Memory {
        self.0.get().expect("set by the test")
    }
}

static LIMITED: Late = Late(OnceLock::new());
static BLOCKS: AtomicUsize = AtomicUsize::new(0);

#[cached(memory = LIMITED)]
fn block(x: u64) -> Vec<u8> {
    BLOCKS.fetch_add(1, Ordering::Relaxed);
    vec![x as u8; 64 << 10]
}

#[test]
fn the_local_folder_keeps_its_own_size_limit_and_the_server_keeps_everything() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-limit");
    let memory = moto
        .config("limit")
        .local_dir(dir.join("local"))
        .local_limit(Some(256 << 10))
        .build()
        .unwrap()
        .memory_tier(0);
    assert!(LIMITED.0.set(memory).is_ok());
    for x in 0..40 {
        assert_eq!(block(x)[0], x as u8);
    }
    assert_eq!(BLOCKS.load(Ordering::Relaxed), 40);
    // 2.5 MiB stored: the size checks (every 1 MiB stored) evict locally, in the background.
    let started = Instant::now();
    while entry_files(&dir.join("local")).len() >= 40 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing evicted locally"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let remote = LIMITED.as_memory().functions().unwrap();
    assert_eq!(remote[0].entries(), 40, "the server keeps every entry");
    // Every value is still a hit: from the local folder, or fetched again from the server.
    for x in 0..40 {
        assert_eq!(block(x)[0], x as u8);
    }
    assert_eq!(BLOCKS.load(Ordering::Relaxed), 40, "nothing recomputed");
}

#[test]
fn an_expired_entry_on_the_server_is_recomputed_once_and_replaced() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-expired");
    let machine = |name: &str| Machine::new(&moto, "expired", &dir, name).with(EXPIRING, "1");
    machine("first").run(&[6]);
    std::thread::sleep(Duration::from_millis(2500));
    // Expired: recomputed, and the newer entry replaces the old one on the server...
    let output = machine("second").run(&[6]);
    assert_eq!(values(&output), right(&[6]));
    assert_eq!(computations(&dir.join("counter")), BTreeMap::from([(6, 2)]));
    // ...so that the next machine uses it.
    let output = machine("third").run(&[6]);
    assert_eq!(values(&output), right(&[6]));
    assert!(text(&output).contains("misses=0"), "{}", text(&output));
    assert_eq!(computations(&dir.join("counter")), BTreeMap::from([(6, 2)]));
}

static ASYNC_SHARED: Late = Late(OnceLock::new());
static FETCHES: AtomicUsize = AtomicUsize::new(0);

#[cached(memory = ASYNC_SHARED)]
async fn fetch_page(id: u64) -> String {
    FETCHES.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    format!("page {id}")
}

#[test]
fn async_functions_share_through_the_server_inside_a_tokio_runtime() {
    let moto = Moto::start();
    let dir = fresh_dir("remote-async");
    let memory = moto
        .config("async")
        .local_dir(dir.join("local"))
        .build()
        .unwrap()
        .memory_tier(0);
    assert!(ASYNC_SHARED.0.set(memory).is_ok());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Four tasks on one key: computed once, its lease taken and released on the way.
        let tasks: Vec<_> = (0..4).map(|_| tokio::spawn(fetch_page(1))).collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "page 1");
        }
        assert_eq!(fetch_page(2).await, "page 2");
    });
    assert_eq!(FETCHES.load(Ordering::Relaxed), 2);
    // The values are on the server: with the local folder gone, they are fetched, not computed.
    std::fs::remove_dir_all(dir.join("local")).unwrap();
    runtime.block_on(async {
        assert_eq!(fetch_page(1).await, "page 1");
        assert_eq!(fetch_page(2).await, "page 2");
    });
    assert_eq!(FETCHES.load(Ordering::Relaxed), 2);
    assert_eq!(
        ASYNC_SHARED.as_memory().functions().unwrap()[0].entries(),
        2
    );
    drop(runtime);
}

/// Waits until the machines have started `n` computations.
fn wait_for_computations(counter: &Path, n: usize) {
    let started = Instant::now();
    while computations(counter).values().sum::<usize>() < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no computation started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
