//! `.par_cached_map(f)`: order, hits before computing, duplicates, failures, thread counts,
//! reduction, and resuming a run that was killed.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{append_line, child_test, count_lines, fresh_dir, stored_keys, Counter};
use memo::prelude::*;
use rayon::prelude::*;

static MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("par-map")));

static ORDERED: Counter = Counter::new();

/// Later items finish first, so completion order is not input order.
#[cached(memory = MEMORY)]
fn ordered(x: u64) -> u64 {
    ORDERED.bump();
    thread::sleep(Duration::from_millis(40 - x));
    x * 10
}

#[test]
fn results_come_back_in_input_order_and_the_rerun_computes_nothing() {
    let expected: Vec<u64> = (0..40).map(|x| x * 10).collect();
    let first = (0..40u64).par_cached_map(ordered).jobs(4).run().unwrap();
    assert_eq!(first.results, expected);
    assert_eq!((first.computed, first.from_cache), (40, 0));
    assert_eq!(first.shard, None);
    assert_eq!(ORDERED.get(), 40);

    let again = (0..40u64).par_cached_map(ordered).jobs(4).run().unwrap();
    assert_eq!(again.results, expected);
    assert_eq!((again.computed, again.from_cache), (0, 40));
    assert_eq!(ORDERED.get(), 40);
    // Each item slept at least 1 ms when it was computed: the stored durations say so.
    assert!(
        again.saved >= Duration::from_millis(40),
        "{:?}",
        again.saved
    );
}

static DUPLICATES: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn duplicated(x: u64) -> u64 {
    DUPLICATES.bump();
    thread::sleep(Duration::from_millis(50));
    x + 1
}

#[test]
fn duplicate_inputs_are_computed_once() {
    let items = [3u64, 3, 5, 3, 5, 5, 3, 9];
    let outcome = items.par_cached_map(duplicated).jobs(4).run().unwrap();
    assert_eq!(outcome.results, [4, 4, 6, 4, 6, 6, 4, 10]);
    assert_eq!(DUPLICATES.get(), 3);
    assert_eq!((outcome.computed, outcome.from_cache), (3, 5));
}

static FAIL_SEVEN: AtomicBool = AtomicBool::new(true);
static FRAGILE: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn fragile(x: u64) -> u64 {
    FRAGILE.bump();
    if x == 7 && FAIL_SEVEN.load(Ordering::SeqCst) {
        panic!("item seven is broken");
    }
    x * x
}

#[test]
fn a_failing_item_does_not_discard_the_others() {
    let error = (0..16u64)
        .par_cached_map(fragile)
        .jobs(3)
        .try_collect()
        .unwrap_err();
    assert_eq!(error.failures.len(), 1);
    assert_eq!(error.failures[0].index, 7);
    assert_eq!(error.failures[0].input, 7);
    assert_eq!(error.failures[0].message, "item seven is broken");
    assert_eq!(error.partial[6], Some(36));
    assert_eq!(error.partial[7], None);
    assert!(
        error.to_string().contains("1 of 16 items failed"),
        "{error}"
    );
    for x in (0..16).filter(|&x| x != 7) {
        assert!(
            fragile::is_cached(x),
            "item {x} finished and must be stored"
        );
    }
    assert_eq!(FRAGILE.get(), 16);

    // Fixed: the rerun computes only the failed item.
    FAIL_SEVEN.store(false, Ordering::SeqCst);
    let all: Vec<u64> = (0..16u64).par_cached_map(fragile).collect();
    assert_eq!(all, (0..16).map(|x| x * x).collect::<Vec<_>>());
    assert_eq!(FRAGILE.get(), 17);
}

#[cached(memory = MEMORY)]
fn always_fails(x: u64) -> u64 {
    if x == 2 {
        panic!("two");
    }
    x
}

#[test]
fn collect_reports_the_failed_items_after_finishing_the_rest() {
    let caught = std::panic::catch_unwind(|| {
        let _: Vec<u64> = (0..5u64).par_cached_map(always_fails).collect();
    })
    .unwrap_err();
    let message = caught.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("1 of 5 items failed"), "{message}");
    assert!(message.contains("item 2: two"), "{message}");
    assert!(always_fails::is_cached(4));
}

#[cached(memory = MEMORY)]
fn collatz_steps(mut n: u64) -> u32 {
    let mut steps = 0;
    while n != 1 {
        n = if n.is_multiple_of(2) {
            n / 2
        } else {
            3 * n + 1
        };
        steps += 1;
    }
    steps
}

#[test]
fn one_thread_and_many_threads_give_the_same_results() {
    let sequential: Vec<u32> = (1..300u64).par_cached_map(collatz_steps).jobs(1).collect();
    collatz_steps::clear().unwrap();
    let parallel: Vec<u32> = (1..300u64).par_cached_map(collatz_steps).jobs(7).collect();
    let plain: Vec<u32> = (1..300u64).map(collatz_steps::call_uncached).collect();
    assert_eq!(sequential, plain);
    assert_eq!(parallel, plain);
}

static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MOST_RUNNING: AtomicUsize = AtomicUsize::new(0);
static WAIT_FOR: AtomicUsize = AtomicUsize::new(0);

/// Records how many bodies run at once; waits (up to 10 s) until `WAIT_FOR` bodies run together.
#[cached(memory = MEMORY)]
fn concurrent(x: u64) -> u64 {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MOST_RUNNING.fetch_max(now, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while MOST_RUNNING.load(Ordering::SeqCst) < WAIT_FOR.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(20));
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    x
}

static CONCURRENCY_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn most_running(items: std::ops::Range<u64>, jobs: usize, wait_for: usize) -> usize {
    MOST_RUNNING.store(0, Ordering::SeqCst);
    WAIT_FOR.store(wait_for, Ordering::SeqCst);
    let results: Vec<u64> = items
        .clone()
        .par_cached_map(concurrent)
        .jobs(jobs)
        .collect();
    assert_eq!(results, items.collect::<Vec<_>>());
    MOST_RUNNING.load(Ordering::SeqCst)
}

#[test]
fn the_thread_count_is_honoured_including_more_threads_than_cores() {
    let _serial = CONCURRENCY_TESTS.lock().unwrap();
    // Eight sleeping items on eight threads all run at once (more threads than cores).
    assert_eq!(most_running(0..8, 8, 8), 8);
    // Exactly as many as asked for: three run together, never a fourth.
    assert_eq!(most_running(100..120, 3, 3), 3);
    assert_eq!(most_running(400..410, 1, 0), 1);
}

#[test]
fn the_global_rayon_pool_is_left_alone() {
    let _serial = CONCURRENCY_TESTS.lock().unwrap();
    WAIT_FOR.store(0, Ordering::SeqCst);
    let before = rayon::current_num_threads();
    let _: Vec<u64> = (500..510u64).par_cached_map(concurrent).jobs(5).collect();
    assert_eq!(rayon::current_num_threads(), before);
    // Inside a pool the caller installed, the default runs in that pool.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    MOST_RUNNING.store(0, Ordering::SeqCst);
    pool.install(|| {
        let _: Vec<u64> = (600..620u64).par_cached_map(concurrent).collect();
    });
    assert!(MOST_RUNNING.load(Ordering::SeqCst) <= 2);
}

static SCALED: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn scaled(x: &u64, factor: u64) -> u64 {
    SCALED.bump();
    x * factor
}

#[test]
fn closures_pass_extra_arguments_and_items_by_reference() {
    let problems: Vec<u64> = (1..5).collect();
    let by_ref: Vec<u64> = problems.iter().par_cached_map(|x| scaled(x, 10)).collect();
    assert_eq!(by_ref, [10, 20, 30, 40]);
    let by_value: Vec<u64> = problems.par_cached_map(|x| scaled(&x, 10)).collect();
    assert_eq!(by_value, [10, 20, 30, 40]);
    assert_eq!(problems.len(), 4, "a Vec is borrowed, not consumed");
    assert_eq!(SCALED.get(), 4);
}

#[test]
fn a_closure_that_calls_no_cached_function_still_maps_correctly() {
    let doubled: Vec<u64> = (0..50u64).par_cached_map(|x| 2 * x).jobs(3).collect();
    assert_eq!(doubled, (0..50).map(|x| 2 * x).collect::<Vec<_>>());
}

static LATE_RUNS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn late(x: u64) -> u64 {
    x + 1
}

#[test]
fn once_the_first_items_call_no_cached_function_the_others_are_not_looked_up() {
    // Items 0..20 call nothing cached; later ones do. After 8 of the first, the map stops
    // looking items up, so a later item runs once (a looked-up miss would run its start twice:
    // once in the look-up, once computed).
    let f = |x: u64| {
        if x == 30 {
            LATE_RUNS.bump();
        }
        if x >= 20 {
            late(x)
        } else {
            x
        }
    };
    let out: Vec<u64> = (0..40u64).par_cached_map(f).jobs(1).collect();
    assert_eq!(out, (0..40).map(f).collect::<Vec<_>>());
    assert_eq!(LATE_RUNS.get(), 2, "once in the map, once just above");
}

static NEW_RUN_STARTS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn new_run_item(x: u64) -> u64 {
    x * 7
}

#[test]
fn once_the_first_64_items_all_miss_the_others_are_not_looked_up() {
    // Every item is new: after 64 looked-up misses the map computes the rest directly, so the
    // code before the cached call runs twice for the first 64 items only (look-up, then
    // computation) and once for the other 136.
    let f = |x: u64| {
        NEW_RUN_STARTS.bump();
        new_run_item(x)
    };
    let out: Vec<u64> = (0..200u64).par_cached_map(f).jobs(1).collect();
    assert_eq!(out, (0..200).map(|x| x * 7).collect::<Vec<_>>());
    assert_eq!(NEW_RUN_STARTS.get(), 64 * 2 + 136);
}

static MIXED_RUN_STARTS: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn mixed_run_item(x: u64) -> u64 {
    x * 11
}

#[test]
fn a_hit_among_the_first_items_keeps_every_item_looked_up() {
    // Item 0 is stored beforehand: with a hit among them, the misses are all looked up first
    // (hits served before computations), so each of the 199 misses starts twice.
    assert_eq!(mixed_run_item(0), 0);
    let f = |x: u64| {
        MIXED_RUN_STARTS.bump();
        mixed_run_item(x)
    };
    let out: Vec<u64> = (0..200u64).par_cached_map(f).jobs(1).collect();
    assert_eq!(out, (0..200).map(|x| x * 11).collect::<Vec<_>>());
    assert_eq!(MIXED_RUN_STARTS.get(), 1 + 199 * 2);
}

#[cached(memory = MEMORY)]
fn word_length(word: String) -> usize {
    word.chars().count()
}

#[test]
fn map_then_reduce() {
    let words: Vec<String> = ["map", "then", "reduce", "λ"].map(String::from).to_vec();
    let total: usize = words.par_cached_map(word_length).into_iter().sum();
    assert_eq!(total, 3 + 4 + 6 + 1);
    let longest = words
        .par_cached_map(word_length)
        .into_par_iter()
        .reduce(|| 0, usize::max);
    assert_eq!(longest, 6);
}

// --- Resuming a killed run: the test binary runs itself as the child. ---

const CHILD_COUNTER: &str = "MEMO_TEST_RESUME_COUNTER";

#[cached]
fn slow_item(x: u64) -> u64 {
    thread::sleep(Duration::from_millis(100));
    let path = std::env::var_os(CHILD_COUNTER).expect("counter file");
    append_line(std::path::Path::new(&path), &x.to_string());
    x * 3
}

#[test]
#[ignore = "run by resume_after_a_killed_run as a child process"]
fn resume_child() {
    let total: u64 = (0..30u64)
        .par_cached_map(slow_item)
        .jobs(2)
        .into_iter()
        .sum();
    println!("total={total}");
}

fn child(cache: &std::path::Path, counter: &std::path::Path) -> Command {
    let mut command = child_test("resume_child");
    command
        .env("MEMO_DIR", cache)
        .env(CHILD_COUNTER, counter)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn the_rerun_of_a_killed_run_computes_only_what_is_missing() {
    let dir = fresh_dir("resume");
    let (cache, counter) = (dir.join("cache"), dir.join("counter"));
    let mut running = child(&cache, &counter).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_lines(&counter) < 8 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    running.kill().unwrap(); // SIGKILL on Unix
    running.wait().unwrap();
    let computed_before = count_lines(&counter);
    let stored = stored_keys(&cache).len();
    assert!(
        stored >= 6,
        "the killed run stored its finished items ({stored})"
    );
    assert!(stored < 30, "the run was killed part way ({stored} stored)");

    let output = child(&cache, &counter).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("total={}", (0..30).sum::<u64>() * 3)),
        "{stdout}"
    );
    let computed_in_rerun = count_lines(&counter) - computed_before;
    assert_eq!(
        computed_in_rerun,
        30 - stored,
        "only the missing items are computed"
    );
    assert_eq!(stored_keys(&cache).len(), 30);
}

static EVENTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn event(text: String) {
    EVENTS.lock().unwrap().push(text);
}

#[cached(memory = MEMORY)]
fn logged(x: u64) -> u64 {
    event(format!("compute {x}"));
    x
}

#[test]
fn cached_items_are_served_before_any_item_is_computed() {
    logged(2);
    logged(3);
    EVENTS.lock().unwrap().clear();
    let results: Vec<u64> = (1..4u64)
        .par_cached_map(|x| {
            let value = logged(x);
            event(format!("return {x}"));
            value
        })
        .jobs(1)
        .collect();
    assert_eq!(results, [1, 2, 3]);
    assert_eq!(
        *EVENTS.lock().unwrap(),
        ["return 2", "return 3", "compute 1", "return 1"]
    );
}

static CAUGHT: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn caught_square(x: u64) -> u64 {
    CAUGHT.bump();
    x * x
}

#[test]
fn an_item_that_catches_panics_around_its_cached_call_still_gets_its_value() {
    // The look-up stops a missed call by unwinding; `f` catching it must not make its made-up
    // result (`None` here) the item's.
    let results: Vec<Option<u64>> = (0..8u64)
        .par_cached_map(|x| std::panic::catch_unwind(|| caught_square(x)).ok())
        .collect();
    assert_eq!(results, (0..8).map(|x| Some(x * x)).collect::<Vec<_>>());
    assert_eq!(CAUGHT.get(), 8);
}

static INNER: Counter = Counter::new();

#[cached(memory = MEMORY)]
fn inner_square(x: u64) -> u64 {
    INNER.bump();
    x * x
}

#[test]
fn a_map_inside_an_item_computes_on_a_cold_cache_and_is_all_hits_after() {
    let nested = || {
        (0..4u64)
            .par_cached_map(|x| {
                (0..3u64)
                    .par_cached_map(move |y| inner_square(10 * x + y))
                    .jobs(1)
                    .collect::<Vec<u64>>()
                    .iter()
                    .sum::<u64>()
            })
            .run()
            .unwrap()
    };
    let expected: Vec<u64> = (0..4u64)
        .map(|x| (0..3).map(|y| (10 * x + y) * (10 * x + y)).sum())
        .collect();
    let first = nested();
    assert_eq!(first.results, expected);
    assert_eq!((first.computed, first.from_cache), (4, 0));
    assert_eq!(INNER.get(), 12);
    let again = nested();
    assert_eq!(again.results, expected);
    assert_eq!((again.computed, again.from_cache), (0, 4));
    assert_eq!(INNER.get(), 12);
}

#[cached(memory = MEMORY)]
fn noted_on_drop(x: u64) -> u64 {
    x + 1
}

#[cached(memory = MEMORY)]
fn guarded_square(x: u64) -> u64 {
    x * x
}

#[test]
fn a_drop_that_calls_a_cached_function_during_the_look_up_does_not_abort() {
    struct Note(u64);
    impl Drop for Note {
        fn drop(&mut self) {
            assert_eq!(noted_on_drop(self.0), self.0 + 1);
        }
    }
    let results: Vec<u64> = (0..4u64)
        .par_cached_map(|x| {
            let _note = Note(1000 + x);
            guarded_square(5000 + x)
        })
        .jobs(1)
        .collect();
    assert_eq!(results, (5000..5004u64).map(|x| x * x).collect::<Vec<_>>());
}
