//! Sharding `.par_cached_map(f)` between the jobs of a job array: `Shard` parsing, shards run one
//! after another in one process, and shards run as concurrent processes that share one cache
//! through `MEMO_DIR` and take their shard from `MEMO_SHARD` (the test binary runs itself as the
//! child, `shard_child` below).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{LazyLock, Mutex};
use std::thread;
use std::time::Duration;

use common::{append_line, child_test, count_lines, fresh_dir};
use memo::par_map::{MapError, MapOutcome, Shard, ShardError, MEMO_SHARD};
use memo::prelude::*;

static MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("sharding")));

/// The items a cached function computed, one entry per computation.
struct Computations(Mutex<Vec<u64>>);

impl Computations {
    const fn new() -> Self {
        Computations(Mutex::new(Vec::new()))
    }

    fn record(&self, x: u64) {
        self.0.lock().unwrap().push(x);
    }

    /// How many times `x` was computed.
    fn of(&self, x: u64) -> usize {
        self.0.lock().unwrap().iter().filter(|&&y| y == x).count()
    }

    /// How many computations there were in all.
    fn total(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn shard(index: usize, count: usize) -> Shard {
    Shard::new(index, count).unwrap()
}

#[test]
fn shards_are_parsed_and_checked() {
    let third = shard(3, 16);
    assert_eq!((third.index(), third.count()), (3, 16));
    assert_eq!(third.to_string(), "3/16");
    for text in ["3/16", " 3/16\n", "3 / 16", "\t3/ 16 "] {
        assert_eq!(text.parse::<Shard>(), Ok(third), "{text:?}");
    }
    assert_eq!("1/1".parse::<Shard>(), Ok(shard(1, 1)));
    assert_eq!("16/16".parse::<Shard>(), Ok(shard(16, 16)));

    let error = |text: &str| text.parse::<Shard>().unwrap_err();
    assert_eq!(
        error("0/16"),
        ShardError::OutOfRange {
            index: 0,
            count: 16
        }
    );
    assert_eq!(
        error("0/16").to_string(),
        "shard 0/16: shards are numbered 1 to 16 (add 1 to a 0-based index)"
    );
    assert_eq!(
        error("17/16"),
        ShardError::OutOfRange {
            index: 17,
            count: 16
        }
    );
    assert_eq!(
        error("17/16").to_string(),
        "shard 17/16: shards are numbered 1 to 16"
    );
    assert_eq!(error("3/0"), ShardError::NoShards { index: 3 });
    assert_eq!(
        error("3/0").to_string(),
        "shard 3/0: the number of shards must be at least 1"
    );
    assert_eq!(
        Shard::new(0, 16),
        Err(ShardError::OutOfRange {
            index: 0,
            count: 16
        })
    );
    assert_eq!(Shard::new(17, 16).unwrap_err(), error("17/16"));
    assert_eq!(Shard::new(3, 0).unwrap_err(), error("3/0"));

    for (text, problem) in [
        ("x", "no '/'"),
        ("", "no '/'"),
        ("3", "no '/'"),
        ("3/", "COUNT is missing"),
        ("3/ ", "COUNT is missing"),
        ("/16", "INDEX is missing"),
        ("x/16", "INDEX is not a whole number"),
        ("-1/4", "INDEX is not a whole number"),
        ("3.5/16", "INDEX is not a whole number"),
        ("3/x", "COUNT is not a whole number"),
        ("3/16/2", "COUNT is not a whole number"),
    ] {
        let found = error(text);
        assert_eq!(
            found,
            ShardError::Malformed {
                text: text.to_owned(),
                problem
            },
            "{text:?}"
        );
        assert_eq!(
            found.to_string(),
            format!(
                "{text:?} is not a shard ({problem}): expected INDEX/COUNT, e.g. 3/16 for the 3rd \
                 of 16 shards"
            )
        );
    }
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(error("x"));
    assert!(boxed.to_string().contains("expected INDEX/COUNT"));
}

static SPLIT: Computations = Computations::new();

#[cached(memory = MEMORY)]
fn split(x: u64) -> u64 {
    SPLIT.record(x);
    x * 3 + 1
}

#[test]
fn shards_run_one_after_another_compute_every_item_once() {
    let items: Vec<u64> = (0..40).collect();
    let expected: Vec<u64> = items.iter().map(|x| x * 3 + 1).collect();
    let mut done = 0;
    for index in 1..=4 {
        let shard = shard(index, 4);
        let run = items.par_cached_map(split).shard(shard).jobs(3).run();
        // (from cache, computed, left to other shards), from the outcome or the error.
        let (from_cache, computed, left) = match &run {
            Ok(outcome) => {
                assert_eq!(outcome.shard, Some(shard));
                assert_eq!(
                    outcome.results, expected,
                    "the last shard completes the map"
                );
                (outcome.from_cache, outcome.computed, 0)
            }
            Err(error) => {
                assert!(error.awaits_other_shards(), "{error}");
                assert_eq!(error.shard, Some(shard));
                (
                    error.from_cache,
                    error.computed,
                    error.left_to_other_shards.len(),
                )
            }
        };
        assert_eq!(
            from_cache, done,
            "shard {shard} is served what the shards before it computed"
        );
        assert!(computed > 0, "shard {shard} has a share of 40 items");
        done += computed;
        assert_eq!(SPLIT.total(), done, "shard {shard} computed only its share");
        assert_eq!(left, 40 - done, "shard {shard}");
        assert_eq!(run.is_ok(), index == 4, "only the last shard is complete");
    }
    for &x in &items {
        assert_eq!(SPLIT.of(x), 1, "item {x} is computed by exactly one shard");
    }

    // The gather step: all hits, in input order.
    let gather = items.par_cached_map(split).no_shard().run().unwrap();
    assert_eq!(gather.results, expected);
    assert_eq!((gather.computed, gather.from_cache), (0, 40));
    assert_eq!(gather.shard, None);
    assert_eq!(SPLIT.total(), 40);
}

static PART: Computations = Computations::new();

#[cached(memory = MEMORY)]
fn part(x: u64) -> u64 {
    PART.record(x);
    x + 100
}

#[test]
fn a_shard_whose_others_have_not_run_returns_an_error_naming_what_they_left() {
    let items: Vec<u64> = (0..30).collect();
    let expected: Vec<u64> = items.iter().map(|x| x + 100).collect();
    let second = shard(2, 3);
    let error = items
        .par_cached_map(part)
        .shard(second)
        .try_collect()
        .unwrap_err();
    assert!(error.awaits_other_shards());
    assert!(error.failures.is_empty() && error.shard_error().is_none());
    assert_eq!(error.shard, Some(second));
    let left = error.left_to_other_shards.clone();
    assert!(!left.is_empty() && left.len() < 30, "{left:?}");
    assert!(left.windows(2).all(|w| w[0] < w[1]), "in input order");
    assert_eq!(PART.total(), 30 - left.len());
    for (i, value) in error.partial.iter().enumerate() {
        let x = i as u64;
        if left.contains(&i) {
            assert_eq!((*value, PART.of(x)), (None, 0), "item {i}");
        } else {
            assert_eq!((*value, PART.of(x)), (Some(x + 100), 1), "item {i}");
        }
    }
    let message = format!(
        "shard 2/3: {} of 30 items belong to other shards and are not cached yet; run without a \
         shard (or .no_shard()) once all shards are done to gather the results",
        left.len()
    );
    assert_eq!(error.to_string(), message);

    // `collect` panics with that message, and computes nothing more.
    let caught = std::panic::catch_unwind(|| {
        let _: Vec<u64> = items.par_cached_map(part).shard(second).collect();
    })
    .unwrap_err();
    let panicked = caught.downcast_ref::<String>().cloned().unwrap_or_default();
    assert_eq!(panicked, format!("par_cached_map: {message}"));
    assert_eq!(PART.total(), 30 - left.len());

    // Once the other shards ran, the same shard collects everything, computing nothing.
    for index in [1, 3] {
        // Shard 1 still misses shard 3's items (an error that awaits them); shard 3 has all.
        let run = items.par_cached_map(part).shard(shard(index, 3)).run();
        assert_eq!(run.is_ok(), index == 3);
    }
    assert_eq!(PART.total(), 30);
    let all: Vec<u64> = items.par_cached_map(part).shard(second).collect();
    assert_eq!(all, expected);
    assert_eq!(PART.total(), 30);
    assert!(items.iter().all(|&x| PART.of(x) == 1));
}

static LATE: Computations = Computations::new();

#[cached(memory = MEMORY)]
fn late(x: u64) -> u64 {
    LATE.record(x);
    x * 5
}

#[test]
fn a_shard_that_finishes_after_the_others_returns_everything() {
    let items: Vec<u64> = (0..24).collect();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    // Shard 1 of 2 runs shard 2 of 2, on another thread, when it starts computing (after its
    // look-ups: 24 calls); at its end, it finds shard 2's results cached.
    let outcome = items
        .par_cached_map(|x| {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == items.len() {
                thread::scope(|scope| {
                    scope.spawn(|| {
                        let other = items.par_cached_map(late).shard(shard(2, 2)).try_collect();
                        let left = other.unwrap_err().left_to_other_shards.len();
                        assert_eq!(left, 24 - LATE.total());
                    });
                });
            }
            late(x)
        })
        .shard(shard(1, 2))
        .jobs(1)
        .run()
        .unwrap();
    assert_eq!(
        outcome.results,
        items.iter().map(|x| x * 5).collect::<Vec<_>>()
    );
    assert!(
        outcome.computed > 0 && outcome.from_cache > 0,
        "{outcome:?}"
    );
    assert_eq!(outcome.computed + outcome.from_cache, 24);
    assert_eq!(LATE.total(), 24);
    assert!(items.iter().all(|&x| LATE.of(x) == 1));
}

static REPEATED: Computations = Computations::new();

#[cached(memory = MEMORY)]
fn repeated(x: u64) -> u64 {
    REPEATED.record(x);
    x * 2
}

/// The values of the items a shard left to the others, sorted (none when it collected them all).
fn left_values(items: &[u64], index: usize) -> Vec<u64> {
    let mut values: Vec<u64> = match items
        .par_cached_map(repeated)
        .shard(shard(index, 3))
        .try_collect()
    {
        Ok(results) => {
            assert_eq!(results, items.iter().map(|x| x * 2).collect::<Vec<_>>());
            Vec::new()
        }
        Err(error) => {
            assert!(error.awaits_other_shards(), "{error}");
            error
                .left_to_other_shards
                .iter()
                .map(|&i| items[i])
                .collect()
        }
    };
    values.sort_unstable();
    values
}

#[test]
fn equal_items_land_in_one_shard_whatever_the_order() {
    // Thirteen values, each repeated at positions that fall in every residue modulo 3.
    let items: Vec<u64> = (0..60).map(|i| i % 13 * 11).collect();
    let reversed: Vec<u64> = items.iter().rev().copied().collect();
    for index in 1..=3 {
        let left = left_values(&items, index);
        if index == 1 {
            assert!(
                !left.is_empty(),
                "the first of three shards computes a share"
            );
        }
        for value in (0..13).map(|v| v * 11) {
            let copies = items.iter().filter(|&&x| x == value).count();
            let here = left.iter().filter(|&&x| x == value).count();
            assert!(
                here == 0 || here == copies,
                "shard {index}/3 left {here} of the {copies} copies of {value}"
            );
        }
        // The same shard over the items in another order owns the same items: it finds its
        // share cached, computes nothing, and leaves the same items to the others.
        let computed = REPEATED.total();
        assert_eq!(left_values(&reversed, index), left, "shard {index}/3");
        assert_eq!(REPEATED.total(), computed, "shard {index}/3");
    }
    for value in (0..13).map(|v| v * 11) {
        assert_eq!(REPEATED.of(value), 1, "{value}");
    }
}

#[test]
fn items_of_a_closure_without_cached_calls_are_computed_by_every_shard() {
    // Nothing of them can be shared: each shard computes them all, and is complete.
    for index in 1..=4 {
        let outcome = (0..12u64)
            .par_cached_map(|x| x * 2)
            .shard(shard(index, 4))
            .progress(false)
            .run()
            .unwrap();
        assert_eq!(outcome.results, (0..12).map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!((outcome.computed, outcome.from_cache), (12, 0));
    }
}

static MIXED: Computations = Computations::new();

#[cached(memory = MEMORY)]
fn mixed(x: u64) -> u64 {
    MIXED.record(x);
    x + 7
}

#[test]
fn a_closure_that_calls_a_cached_function_for_some_items_only_is_split_by_key() {
    // Item 0 calls nothing cached: under a shard, the other items are still looked up and split
    // by their keys (not all computed by whichever shard met item 0 first).
    let f = |x: u64| if x == 0 { 0 } else { mixed(x) };
    let items: Vec<u64> = (0..30).collect();
    for index in 1..=3 {
        let before = MIXED.total();
        let _ = items.par_cached_map(f).shard(shard(index, 3)).jobs(2).run();
        let share = MIXED.total() - before;
        assert!(
            share > 0 && share < 20,
            "shard {index}/3 computed {share} of 29 items: only its share"
        );
    }
    for x in 1..30 {
        assert_eq!(MIXED.of(x), 1, "item {x} is computed by exactly one shard");
    }
    let all = items.par_cached_map(f).shard(shard(2, 3)).run().unwrap();
    assert_eq!(
        all.results,
        (0..30)
            .map(|x| if x == 0 { 0 } else { x + 7 })
            .collect::<Vec<_>>()
    );
    assert_eq!(MIXED.total(), 29);
}

static FRAGILE: Computations = Computations::new();

#[cached(memory = MEMORY)]
fn fragile(x: u64) -> u64 {
    FRAGILE.record(x);
    assert!(x != 5, "five is broken");
    x
}

#[test]
fn a_failing_item_is_tried_and_reported_by_the_shard_that_owns_it_only() {
    let items: Vec<u64> = (0..16).collect();
    let mut reporters = Vec::new();
    for index in 1..=4 {
        let error = items
            .par_cached_map(fragile)
            .shard(shard(index, 4))
            .jobs(1)
            .progress(false)
            .try_collect()
            .unwrap_err();
        if error.failures.is_empty() {
            // Not its item: left to its shard, still missing at the end.
            assert!(error.awaits_other_shards(), "{error}");
            assert!(error.left_to_other_shards.contains(&5), "{error}");
            continue;
        }
        reporters.push(index);
        assert!(!error.awaits_other_shards());
        assert_eq!(error.failures.len(), 1);
        assert_eq!(error.failures[0].index, 5);
        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "shard {index}/4: 1 of 16 items failed (every other item"
            )),
            "{message}"
        );
        assert!(message.contains("\n  item 5: five is broken"), "{message}");
        if !error.left_to_other_shards.is_empty() {
            assert!(
                message.ends_with(
                    "items belong to other shards and are not cached yet; run without a shard \
                     (or .no_shard()) once all shards are done to gather the results"
                ),
                "{message}"
            );
        }
    }
    assert_eq!(
        reporters.len(),
        1,
        "only the shard that owns item 5 reports it"
    );
    assert_eq!(FRAGILE.of(5), 1, "item 5 is tried by its own shard only");
}

// --- Shards as processes: the test binary runs itself as the child. ---

const COUNTER: &str = "MEMO_TEST_SHARD_COUNTER";
const MODE: &str = "MEMO_TEST_SHARD_MODE";
const ITEMS: u64 = 24;

/// Appends its item and the job's `MEMO_SHARD` to the counter file: one line per computation.
#[cached]
fn job_item(x: u64) -> u64 {
    thread::sleep(Duration::from_millis(30));
    let path = std::env::var_os(COUNTER).expect("counter file");
    let memo_shard = std::env::var(MEMO_SHARD).unwrap_or_default();
    append_line(Path::new(&path), &format!("{x} {memo_shard}"));
    x * x + 1
}

fn expected_job_results() -> Vec<u64> {
    (0..ITEMS).map(|x| x * x + 1).collect()
}

fn report(outcome: Result<MapOutcome<u64>, MapError<u64, u64>>) {
    match outcome {
        Ok(outcome) => println!(
            "computed={} from_cache={} left=0 results={:?}",
            outcome.computed, outcome.from_cache, outcome.results
        ),
        Err(error) if error.awaits_other_shards() => println!(
            "computed={} from_cache={} left={}",
            error.computed,
            error.from_cache,
            error.left_to_other_shards.len()
        ),
        Err(error) => println!(
            "error={error}\nshard_error={}",
            error.shard_error().is_some()
        ),
    }
}

/// Not a test of its own: one job of a job array, as the tests below start it.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn shard_child() {
    println!("from_env={:?}", Shard::from_env());
    let map = (0..ITEMS)
        .par_cached_map(job_item)
        .jobs(2)
        .progress(false)
        .summary(true);
    match std::env::var(MODE).as_deref() {
        Ok("collect") => {
            let results: Vec<u64> = map.collect();
            println!("results={results:?}");
        }
        Ok("no_shard") => report(map.no_shard().run()),
        Ok("one_of_one") => report(map.shard(shard(1, 1)).run()),
        _ => report(map.run()),
    }
}

/// `shard_child` with the cache in `cache`, `MEMO_SHARD` set to `memo_shard` (removed when
/// `None`) and the given mode.
fn child(cache: &Path, counter: &Path, memo_shard: Option<&str>, mode: &str) -> Command {
    let mut command = child_test("shard_child");
    command
        .env("MEMO_DIR", cache)
        .env(COUNTER, counter)
        .env(MODE, mode);
    match memo_shard {
        Some(value) => command.env(MEMO_SHARD, value),
        None => command.env_remove(MEMO_SHARD),
    };
    command
}

/// The output of a child that must succeed.
fn stdout_of(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The number after `name=` in a child's output.
fn number(stdout: &str, name: &str) -> usize {
    let prefix = format!("{name}=");
    stdout
        .split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
        .parse()
        .unwrap()
}

/// The items in the counter file that were computed under `MEMO_SHARD=memo_shard` (every item
/// when `None`), sorted: one per computation.
fn computed_items(counter: &Path, memo_shard: Option<&str>) -> Vec<u64> {
    let text = std::fs::read_to_string(counter).unwrap_or_default();
    let mut items: Vec<u64> = text
        .lines()
        .filter_map(|line| {
            let (item, by) = line.split_once(' ').unwrap_or((line, ""));
            memo_shard
                .is_none_or(|wanted| wanted == by)
                .then(|| item.parse().unwrap())
        })
        .collect();
    items.sort_unstable();
    items
}

#[test]
fn four_processes_share_the_misses_then_a_fifth_gathers_the_results() {
    let dir = fresh_dir("job-array");
    let (cache, counter) = (dir.join("cache"), dir.join("counter"));
    let jobs: Vec<_> = (1..=4)
        .map(|i| {
            let memo_shard = format!("{i}/4");
            child(&cache, &counter, Some(&memo_shard), "run")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut computed = 0;
    for (i, job) in (1..=4).zip(jobs) {
        let stdout = stdout_of(job.wait_with_output().unwrap());
        assert!(
            stdout.contains(&format!(
                "from_env=Ok(Some(Shard {{ index: {i}, count: 4 }}))"
            )),
            "{stdout}"
        );
        let (done, from_cache, left) = (
            number(&stdout, "computed"),
            number(&stdout, "from_cache"),
            number(&stdout, "left"),
        );
        assert_eq!(done + from_cache + left, ITEMS as usize, "{stdout}");
        if left == 0 {
            let results = format!("results={:?}", expected_job_results());
            assert!(stdout.contains(&results), "{stdout}");
        }
        computed += done;
    }
    assert_eq!(
        computed_items(&counter, None),
        (0..ITEMS).collect::<Vec<_>>(),
        "every item is computed exactly once by the four jobs"
    );
    assert_eq!(computed, ITEMS as usize);

    // The split depends on the keys only, not on timing: the same jobs run one after another on
    // another cache compute the same shares, and each leaves what the later ones compute.
    let (cache2, counter2) = (dir.join("cache2"), dir.join("counter2"));
    let mut done = 0;
    for i in 1..=4 {
        let memo_shard = format!("{i}/4");
        let output = child(&cache2, &counter2, Some(&memo_shard), "run")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let stdout = stdout_of(output);
        let share = computed_items(&counter2, Some(&memo_shard));
        assert_eq!(
            share,
            computed_items(&counter, Some(&memo_shard)),
            "{memo_shard}"
        );
        assert_eq!(number(&stdout, "computed"), share.len(), "{stdout}");
        assert_eq!(number(&stdout, "from_cache"), done, "{stdout}");
        done += share.len();
        assert_eq!(number(&stdout, "left"), ITEMS as usize - done, "{stdout}");
        let summary = format!(
            "memo: shard {i}/4: {ITEMS} items: {} loaded from cache, {} computed{} in ",
            done - share.len(),
            share.len(),
            match ITEMS as usize - done {
                0 => String::new(),
                left => format!(", {left} left to other shards"),
            }
        );
        assert!(stderr.contains(&summary), "{summary}\n{stderr}");
    }
    assert_eq!(done, ITEMS as usize);

    // The gather step: no MEMO_SHARD, all hits.
    let stdout = stdout_of(child(&cache, &counter, None, "collect").output().unwrap());
    assert!(stdout.contains("from_env=Ok(None)"), "{stdout}");
    assert!(
        stdout.contains(&format!("results={:?}", expected_job_results())),
        "{stdout}"
    );
    assert_eq!(
        count_lines(&counter),
        ITEMS as usize,
        "the gather computes nothing"
    );
}

#[test]
fn with_the_cache_off_a_shard_computes_every_item_and_returns_them_all() {
    // Nothing can be shared: each job is a plain parallel map, not an incomplete share forever.
    let dir = fresh_dir("disabled-shard");
    let (cache, counter) = (dir.join("cache"), dir.join("counter"));
    let output = child(&cache, &counter, Some("2/4"), "collect")
        .env("MEMO_DISABLE", "1")
        .output()
        .unwrap();
    let stdout = stdout_of(output);
    assert!(
        stdout.contains(&format!("results={:?}", expected_job_results())),
        "{stdout}"
    );
    assert_eq!(count_lines(&counter), ITEMS as usize);
}

#[test]
fn an_invalid_memo_shard_fails_the_map_with_a_clear_message() {
    let dir = fresh_dir("invalid-shard");
    let (cache, counter) = (dir.join("cache"), dir.join("counter"));

    // `run` (and `try_collect`) return the error.
    let stdout = stdout_of(
        child(&cache, &counter, Some("0/4"), "run")
            .output()
            .unwrap(),
    );
    assert!(
        stdout.contains(
            "error=invalid MEMO_SHARD=\"0/4\": shard 0/4: shards are numbered 1 to 4 (add 1 to a \
             0-based index); no item was looked up or computed"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("shard_error=true"), "{stdout}");
    assert!(stdout.contains("from_env=Err(Env"), "{stdout}");

    // `collect` panics with it.
    let output = child(&cache, &counter, Some("three of four"), "collect")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "par_cached_map: invalid MEMO_SHARD=\"three of four\": \"three of four\" is not a \
             shard (no '/'): expected INDEX/COUNT"
        ),
        "{stderr}"
    );
    assert_eq!(count_lines(&counter), 0, "nothing ran");
}

#[test]
fn no_shard_and_shard_override_memo_shard_and_an_empty_one_is_unset() {
    let dir = fresh_dir("override-shard");
    let (cache, counter) = (dir.join("cache"), dir.join("counter"));
    let all = format!("results={:?}", expected_job_results());

    // `.no_shard()` computes everything whatever MEMO_SHARD says.
    let stdout = stdout_of(
        child(&cache, &counter, Some("2/4"), "no_shard")
            .output()
            .unwrap(),
    );
    assert_eq!(
        (number(&stdout, "computed"), number(&stdout, "left")),
        (ITEMS as usize, 0),
        "{stdout}"
    );
    assert!(stdout.contains(&all), "{stdout}");

    // `.shard(..)` wins over MEMO_SHARD, even an invalid one.
    let stdout = stdout_of(
        child(&cache, &counter, Some("x"), "one_of_one")
            .output()
            .unwrap(),
    );
    assert_eq!(number(&stdout, "from_cache"), ITEMS as usize, "{stdout}");
    assert!(stdout.contains(&all), "{stdout}");

    // An empty MEMO_SHARD is no shard.
    let stdout = stdout_of(child(&cache, &counter, Some(""), "run").output().unwrap());
    assert!(stdout.contains("from_env=Ok(None)"), "{stdout}");
    assert_eq!(number(&stdout, "from_cache"), ITEMS as usize, "{stdout}");
    assert!(stdout.contains(&all), "{stdout}");
    assert_eq!(count_lines(&counter), ITEMS as usize);
}
