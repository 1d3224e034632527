//! Behaviour across processes, with the global cache configured by the environment: the test
//! binary runs itself as a child (`child_process` below) in a fresh environment.

mod common;

use std::path::Path;

use common::{append_line, child_test, count_lines, fresh_dir, stored_keys};
use memo::prelude::*;

const CHILD: &str = "MEMO_TEST_CHILD_COUNTER";

/// Appends a line to the counter file named by the environment: one line per computation.
fn count_computation() {
    let path = std::env::var_os(CHILD).expect("counter file");
    append_line(Path::new(&path), "computed");
}

#[cached]
fn expensive(x: u64, label: &str) -> String {
    count_computation();
    format!("{label}:{}", x * x)
}

/// Not a test of its own: what the child process does when the parent starts it.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_process() {
    println!("result={}", expensive(21, "sq"));
    println!(
        "location={}",
        expensive::location()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
}

/// Runs `child_process` in a new process with the given environment changes; returns its output.
fn run_child(counter: &Path, env: &[(&str, Option<&Path>)]) -> String {
    let mut command = child_test("child_process");
    command.env(CHILD, counter);
    for (name, value) in env {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("result=sq:441"), "{stdout}");
    stdout
}

#[test]
fn a_second_process_is_served_what_the_first_computed() {
    let dir = fresh_dir("processes");
    let cache = dir.join("cache");
    let counter = dir.join("counter");
    run_child(&counter, &[("MEMO_DIR", Some(&cache))]);
    assert_eq!(count_lines(&counter), 1);
    run_child(&counter, &[("MEMO_DIR", Some(&cache))]);
    assert_eq!(count_lines(&counter), 1, "the second process must hit");
    assert_eq!(stored_keys(&cache).len(), 1);
}

#[test]
fn memo_disable_turns_caching_off() {
    let dir = fresh_dir("disabled");
    let cache = dir.join("cache");
    let counter = dir.join("counter");
    let disable = Path::new("1");
    for _ in 0..2 {
        run_child(
            &counter,
            &[("MEMO_DIR", Some(&cache)), ("MEMO_DISABLE", Some(disable))],
        );
    }
    assert_eq!(count_lines(&counter), 2);
    assert!(!cache.exists(), "a disabled cache writes nothing");
    // `MEMO_DISABLE=0` means enabled.
    let enable = Path::new("0");
    for _ in 0..2 {
        run_child(
            &counter,
            &[("MEMO_DIR", Some(&cache)), ("MEMO_DISABLE", Some(enable))],
        );
    }
    assert_eq!(count_lines(&counter), 3);
}

#[test]
fn without_memo_dir_the_user_cache_folder_is_used() {
    let dir = fresh_dir("default-location");
    let xdg = dir.join("xdg-cache");
    let counter = dir.join("counter");
    let env = [
        ("XDG_CACHE_HOME", Some(xdg.as_path())),
        ("HOME", Some(dir.as_path())),
    ];
    let stdout = run_child(&counter, &env);
    if cfg!(target_os = "linux") {
        let expected = xdg.join("memo");
        assert!(
            stdout.contains(&format!("location={}", expected.display())),
            "{stdout}"
        );
        assert_eq!(stored_keys(&expected).len(), 1);
    }
    run_child(&counter, &env);
    assert_eq!(count_lines(&counter), 1);
}
