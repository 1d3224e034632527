//! The inspector (`examples/inspect.rs`) end to end, against a cache made by real `#[cached]`
//! functions, asserting on its `--json` output; and the recency it reports.
//!
//! These tests change entries on disk behind the process's back, so their caches run without the
//! in-process memory tier (`memory_tier(0)`): every call reads the disk. `tests/fast_paths.rs`
//! covers the tier.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use common::{entry_files, fresh_dir, inspector};
use memo::prelude::*;
use serde_json::Value;

/// The cache the first test inspects; the other tests use caches of their own.
/// Entries in files of their own: the test damages one (tests/packs.rs inspects packed ones).
static MEMORY: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("inspect"))
        .memory_tier(0)
        .pack_limit(0)
});
static OTHER: LazyLock<Memory> = LazyLock::new(|| {
    Memory::new(fresh_dir("inspect-other"))
        .memory_tier(0)
        .pack_limit(0)
});

#[cached(memory = MEMORY)]
fn alpha(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(5));
    x * 3
}

#[cached(memory = MEMORY)]
fn beta(text: String) -> Vec<u8> {
    text.into_bytes()
}

fn inspect(args: &[&str]) -> Output {
    inspect_in(MEMORY.location().unwrap(), args)
}

fn inspect_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(inspector())
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = inspect(&all);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn function<'a>(list: &'a Value, suffix: &str) -> Option<&'a Value> {
    list.as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str().unwrap().ends_with(suffix))
}

#[test]
fn the_inspector_lists_shows_verifies_and_clears() {
    for x in 0..3 {
        alpha(x);
    }
    beta("hello".into());
    beta("world".into());

    let ls = json(&["ls"]);
    let a = function(&ls, "inspect.alpha").expect("alpha listed");
    assert_eq!(a["versions"].as_array().unwrap().len(), 1);
    assert_eq!(a["versions"][0]["entries"], 3);
    assert_eq!(
        a["versions"][0]["version"].as_str().unwrap(),
        &alpha::version()[..16]
    );
    assert_eq!(
        a["versions"][0]["full_version"].as_str().unwrap(),
        alpha::version()
    );
    assert!(a["versions"][0]["bytes"].as_u64().unwrap() > 72 * 3);
    let stored_compute = a["versions"][0]["compute_time"]["nanos"].as_u64().unwrap()
        + a["versions"][0]["compute_time"]["secs"].as_u64().unwrap() * 1_000_000_000;
    assert!(
        stored_compute >= 15_000_000,
        "3 × 5 ms of compute are stored"
    );
    assert_eq!(
        function(&ls, "inspect.beta").unwrap()["versions"][0]["entries"],
        2
    );

    let show = json(&["show", "alpha"]);
    let entries = show["latest_entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries[0]["readable"].as_bool().unwrap());
    let mut previews: Vec<&str> = entries
        .iter()
        .map(|e| e["preview"].as_str().unwrap())
        .collect();
    previews.sort_unstable();
    assert_eq!(
        previews,
        ["0", "1", "2"],
        "the arguments each entry was computed from"
    );
    let beta = json(&["show", "beta"]);
    let mut texts: Vec<&str> = beta["latest_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["preview"].as_str().unwrap())
        .collect();
    texts.sort_unstable();
    assert_eq!(texts, ["\"hello\"", "\"world\""]);

    let source = inspect(&["source", "beta"]);
    let text = String::from_utf8_lossy(&source.stdout);
    assert!(text.contains("fn beta(text: String) -> Vec<u8>"), "{text}");

    let source = json(&["source", "beta"]);
    assert!(source["source"]
        .as_str()
        .unwrap()
        .contains("fn beta(text: String)"));
    assert_eq!(source["full_version"].as_str().unwrap(), beta::version());

    // Two versions' sources, compared.
    let current = beta::location().unwrap();
    let older = current.with_file_name("0123456789abcdef");
    std::fs::create_dir_all(&older).unwrap();
    let text = std::fs::read_to_string(current.join("source.rs")).unwrap();
    std::fs::write(
        older.join("source.rs"),
        text.replace("into_bytes()", "as_bytes().to_vec()"),
    )
    .unwrap();
    let short = &beta::version()[..16];
    let diff = json(&["diff", "beta", "0123456789abcdef", short]);
    let diff = diff["diff"].as_str().unwrap();
    assert!(diff.contains("-    text.as_bytes().to_vec()"), "{diff}");
    assert!(diff.contains("+    text.into_bytes()"), "{diff}");
    std::fs::remove_dir_all(&older).unwrap();

    let stats = json(&["stats"]);
    assert_eq!(stats["functions"], 2);
    assert_eq!(stats["entries"], 5);

    // A damaged entry is found, and removed with --fix.
    let victim = entry_files(&alpha::location().unwrap())[0].clone();
    std::fs::write(&victim, b"damaged").unwrap();
    assert_eq!(json(&["verify"])["broken"].as_array().unwrap().len(), 1);
    assert_eq!(json(&["verify", "--fix"])["removed"], 1);
    let after = json(&["verify"]);
    assert_eq!(
        (
            after["valid"].as_u64(),
            after["broken"].as_array().unwrap().len()
        ),
        (Some(4), 0)
    );

    // Size control: a dry run lists, a real run evicts (least recently used first) and logs.
    assert!(!inspect(&["gc"]).status.success(), "gc needs a limit");
    let dry = json(&["gc", "--max-items", "2", "--dry-run"]);
    assert_eq!(dry["evicted"].as_array().unwrap().len(), 2);
    assert_eq!(json(&["stats"])["entries"], 4, "a dry run removes nothing");
    let gc = json(&["gc", "--max-items", "3"]);
    assert_eq!(gc["evicted"].as_array().unwrap().len(), 1);
    assert_eq!(gc["evicted"][0]["reason"], "Items");
    assert_eq!(json(&["stats"])["entries"], 3);
    let log = json(&["evictions"]);
    assert_eq!(log.as_array().unwrap().len(), 1);
    assert_eq!(log[0]["reason"], "items");
    assert_eq!(log[0]["key"], gc["evicted"][0]["key"]);

    // Clearing asks first: without a terminal and without --yes, nothing is removed.
    let refused = inspect(&["clear", "alpha"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("without --yes"));
    assert!(function(&json(&["ls"]), "inspect.alpha").is_some());
    let cleared = json(&["clear", "alpha", "--yes"]);
    assert!(cleared["function"]
        .as_str()
        .unwrap()
        .ends_with("inspect.alpha"));
    let ls = json(&["ls"]);
    assert!(function(&ls, "inspect.alpha").is_none());
    assert!(function(&ls, "inspect.beta").is_some());
}

#[test]
fn the_inspector_says_what_is_wrong() {
    let not_a_cache = fresh_dir("not-a-cache");
    let output = Command::new(inspector())
        .arg("--dir")
        .arg(&not_a_cache)
        .arg("ls")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("is not a memo cache"), "{message}");

    recent(100);
    let dir = OTHER.location().unwrap();
    let unknown = inspect_in(dir, &["show", "no_such_function"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no function named"));
    let escape = inspect_in(dir, &["clear", "../../x", "--yes"]);
    assert!(
        !escape.status.success(),
        "names never leave the cache folder"
    );
}

/// Not `Debug`: previewed as `…`.
#[derive(serde::Serialize)]
struct Opaque(u64);

#[cached(memory = OTHER)]
fn opaque(value: Opaque, label: &str) -> u64 {
    value.0 + label.len() as u64
}

#[test]
fn arguments_without_debug_are_previewed_as_an_ellipsis() {
    assert_eq!(opaque(Opaque(1), "ab"), 3);
    let function = OTHER
        .functions()
        .unwrap()
        .into_iter()
        .find(|f| f.name.ends_with(".opaque"))
        .unwrap();
    let entries = OTHER
        .entries(&function.name, &function.versions[0].version)
        .unwrap();
    assert_eq!(entries[0].preview.as_deref(), Some("…, \"ab\""));
}

#[cached(memory = OTHER)]
fn recent(x: u64) -> u64 {
    x
}

#[test]
fn a_hit_refreshes_an_old_entrys_last_use() {
    recent(1);
    let entry = entry_files(&recent::location().unwrap())[0].clone();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    common::set_last_used(&entry, two_hours_ago);
    recent(1);
    let modified = std::fs::metadata(&entry).unwrap().modified().unwrap();
    assert!(
        modified > SystemTime::now() - Duration::from_secs(60),
        "the hit marked the entry as used"
    );
}
