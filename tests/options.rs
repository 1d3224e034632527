//! The options for real code: `ignore(...)`, `key = ...`, `Result` and `Option` results
//! (`store_errors`, `skip_none`), and generic functions.

mod common;

use std::sync::LazyLock;

use common::{fresh_dir, Counter};
use memo::prelude::*;
use serde::Serialize;

static MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("options")));

/// Not serializable: a progress reporter, a logger, a connection...
struct Progress {
    label: &'static str,
}

static SIMULATE: Counter = Counter::new();

#[cached(memory = MEMORY, ignore(verbose, progress))]
fn simulate(steps: u64, verbose: bool, progress: &Progress) -> u64 {
    SIMULATE.bump();
    if verbose {
        let _ = progress.label;
    }
    steps * 2
}

#[test]
fn ignored_arguments_are_left_out_of_the_key_and_need_not_be_serializable() {
    let progress = Progress { label: "run" };
    assert_eq!(simulate(10, true, &progress), 20);
    assert_eq!(simulate(10, false, &Progress { label: "other" }), 20);
    assert_eq!(
        SIMULATE.get(),
        1,
        "verbose and progress do not make another key"
    );
    assert_eq!(simulate(11, false, &progress), 22);
    assert_eq!(SIMULATE.get(), 2, "steps still does");
    assert!(simulate::is_cached(11, true, &progress));
}

static LOAD: Counter = Counter::new();

#[cached(memory = MEMORY, key = name.trim().to_lowercase())]
fn load(name: &str, attempt: Progress) -> String {
    LOAD.bump();
    let _ = attempt.label;
    name.trim().to_uppercase()
}

#[test]
fn a_custom_key_replaces_the_arguments() {
    assert_eq!(load("Alpha", Progress { label: "1" }), "ALPHA");
    assert_eq!(load("  alpha ", Progress { label: "2" }), "ALPHA");
    assert_eq!(LOAD.get(), 1, "equal keys share an entry");
    assert_eq!(load("beta", Progress { label: "3" }), "BETA");
    assert_eq!(LOAD.get(), 2);
}

/// Not serializable, as most error types.
#[derive(Debug, PartialEq)]
struct ParseFailure(String);

static PARSE: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn parse(text: &str) -> Result<u64, ParseFailure> {
    PARSE.bump();
    text.trim()
        .parse()
        .map_err(|_| ParseFailure(text.to_owned()))
}

#[test]
fn only_ok_results_are_stored_by_default() {
    assert_eq!(parse("42"), Ok(42));
    assert_eq!(parse("42"), Ok(42));
    assert_eq!(PARSE.get(), 1, "Ok is stored");
    assert_eq!(parse("x"), Err(ParseFailure("x".into())));
    assert_eq!(parse("x"), Err(ParseFailure("x".into())));
    assert_eq!(PARSE.get(), 3, "Err is computed again every time");
    assert!(!parse::is_cached("x"));
}

static READ_LEN: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn read_len(path: &str) -> std::io::Result<u64> {
    READ_LEN.bump();
    std::fs::metadata(path).map(|m| m.len())
}

#[test]
fn result_aliases_are_results_too() {
    let missing = fresh_dir("aliases").join("missing");
    let missing = missing.to_str().unwrap();
    assert!(read_len(missing).is_err());
    assert!(read_len(missing).is_err());
    assert_eq!(READ_LEN.get(), 2);
    let present = env!("CARGO_MANIFEST_PATH");
    let len = read_len(present).unwrap();
    assert_eq!(read_len(present).unwrap(), len);
    assert_eq!(READ_LEN.get(), 3);
}

static CHECKED: Counter = Counter::new();

#[cached(memory = MEMORY, store_errors)]
fn checked(x: i64) -> Result<i64, String> {
    CHECKED.bump();
    if x < 0 {
        Err(format!("{x} is negative"))
    } else {
        Ok(x)
    }
}

#[test]
fn store_errors_stores_err_values_too() {
    assert_eq!(checked(-1), Err("-1 is negative".to_owned()));
    assert_eq!(checked(-1), Err("-1 is negative".to_owned()));
    assert_eq!(CHECKED.get(), 1);
}

static FIND: Counter = Counter::new();

#[cached(memory = MEMORY, skip_none)]
fn find(id: u32) -> Option<String> {
    FIND.bump();
    id.is_multiple_of(2).then(|| format!("item {id}"))
}

static FIND_ALL: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn find_all(id: u32) -> Option<String> {
    FIND_ALL.bump();
    id.is_multiple_of(2).then(|| format!("item {id}"))
}

#[test]
fn options_are_stored_as_they_are_unless_skip_none() {
    assert_eq!(find(2), Some("item 2".into()));
    assert_eq!(find(2), Some("item 2".into()));
    assert_eq!(find(3), None);
    assert_eq!(find(3), None);
    assert_eq!(FIND.get(), 3, "None is not stored with skip_none");
    assert_eq!(find_all(3), None);
    assert_eq!(find_all(3), None);
    assert_eq!(FIND_ALL.get(), 1, "None is stored by default");
}

static DESCRIBE: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn describe<T>(n: u32) -> String {
    DESCRIBE.bump();
    format!("{n} x {}", std::any::type_name::<T>())
}

#[test]
fn generic_functions_key_on_their_type_parameters() {
    assert_eq!(describe::<u8>(1), "1 x u8");
    assert_eq!(describe::<u16>(1), "1 x u16");
    assert_eq!(describe::<u8>(1), "1 x u8");
    assert_eq!(DESCRIBE.get(), 2, "u8 and u16 never share an entry");
    assert!(describe::is_cached::<u16>(1));
    assert!(!describe::is_cached::<u32>(1));
}

static ZEROS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn zeros<const N: usize>(fill: u8) -> Vec<u8> {
    ZEROS.bump();
    vec![fill; N]
}

#[test]
fn const_generic_values_are_part_of_the_key() {
    assert_eq!(zeros::<3>(0), vec![0; 3]);
    assert_eq!(zeros::<4>(0), vec![0; 4]);
    assert_eq!(zeros::<3>(0), vec![0; 3]);
    assert_eq!(ZEROS.get(), 2);
}

static TOTAL: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn total<T: Serialize + Copy + Into<f64>>(values: &[T]) -> f64 {
    TOTAL.bump();
    values.iter().map(|&v| v.into()).sum()
}

#[test]
fn generic_arguments_work_with_inference() {
    assert_eq!(total(&[1.5f32, 2.5]), 4.0);
    assert_eq!(total(&[1.5f64, 2.5]), 4.0);
    assert_eq!(total(&[1.5f32, 2.5]), 4.0);
    assert_eq!(TOTAL.get(), 2);
    let by_value: Vec<f64> = [1u8, 2, 3].iter().map(|&x| total(&[x, x])).collect();
    assert_eq!(by_value, [2.0, 4.0, 6.0]);
}
