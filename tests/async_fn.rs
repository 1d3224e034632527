//! `async fn`: cached like any function, under any executor (pollster here, tokio below), with
//! simultaneous misses on one key computed once.

mod common;

use std::sync::LazyLock;
use std::time::Duration;

use common::{fresh_dir, Counter};
use memo::prelude::*;
use serde::{Deserialize, Serialize};

static MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("async")));

static FETCH: Counter = Counter::new();

#[cached(memory = MEMORY)]
async fn fetch(id: u32, label: &str) -> String {
    FETCH.bump();
    std::future::ready(()).await;
    format!("{label}-{id}")
}

#[test]
fn async_functions_are_cached_under_any_executor() {
    assert_eq!(pollster::block_on(fetch(1, "a")), "a-1");
    assert_eq!(pollster::block_on(fetch(1, "a")), "a-1");
    assert_eq!(FETCH.get(), 1);
    assert_eq!(pollster::block_on(fetch(2, "a")), "a-2");
    assert_eq!(FETCH.get(), 2);
    assert!(fetch::is_cached(2, "a"));
    assert_eq!(pollster::block_on(fetch::call_uncached(2, "a")), "a-2");
    assert_eq!(FETCH.get(), 3);
}

static SCALED_MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("async-scaled")));
static SCALED: Counter = Counter::new();

/// Primitive parameters only: keyed without the serializer, in an `async fn` too.
#[cached(memory = SCALED_MEMORY)]
async fn scaled(x: u64, by: f32) -> f64 {
    SCALED.bump();
    x as f64 * f64::from(by)
}

#[test]
fn primitive_arguments_of_async_functions_are_keyed_as_the_key_scheme_says() {
    assert_eq!(pollster::block_on(scaled(3, 0.5)), 1.5);
    assert_eq!(pollster::block_on(scaled(3, 0.5)), 1.5);
    assert_eq!(pollster::block_on(scaled(4, 0.5)), 2.0);
    assert_eq!(SCALED.get(), 2);
    let key = |x: u64| {
        common::scheme_key("async_fn::scaled", scaled::version(), |h| {
            h.arg(&x);
            h.arg(&0.5f32);
        })
    };
    let mut expected = vec![key(3), key(4)];
    expected.sort();
    SCALED_MEMORY.flush().unwrap();
    assert_eq!(common::stored_keys(&scaled::location().unwrap()), expected);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Page {
    lines: Vec<String>,
}

static DOWNLOAD: Counter = Counter::new();

/// Slow, so that the eight tasks below miss on the key together.
#[cached(memory = MEMORY)]
async fn download(url: String) -> Result<Page, std::io::Error> {
    DOWNLOAD.bump();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Page {
        lines: vec![url.clone(), url.to_uppercase()],
    })
}

#[test]
fn simultaneous_misses_in_tasks_compute_once_and_futures_are_send() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let pages: Vec<Page> = runtime.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| tokio::spawn(download("memo.example/page".to_owned())))
            .collect();
        let mut pages = Vec::new();
        for task in tasks {
            pages.push(task.await.unwrap().unwrap());
        }
        pages
    });
    assert_eq!(DOWNLOAD.get(), 1, "eight tasks, one computation");
    assert!(pages
        .iter()
        .all(|p| p.lines == ["memo.example/page", "MEMO.EXAMPLE/PAGE"]));
}

#[derive(Serialize)]
struct Client {
    base: String,
}

static GET: Counter = Counter::new();

impl Client {
    #[cached(memory = MEMORY)]
    async fn get(&self, path: &str) -> Option<String> {
        GET.bump();
        (!path.is_empty()).then(|| format!("{}/{path}", self.base))
    }
}

#[test]
fn async_methods_are_cached() {
    let client = Client {
        base: "https://memo".into(),
    };
    assert_eq!(
        pollster::block_on(client.get("x")),
        Some("https://memo/x".into())
    );
    assert_eq!(
        pollster::block_on(client.get("x")),
        Some("https://memo/x".into())
    );
    assert_eq!(GET.get(), 1);
}

static PANICS: Counter = Counter::new();

#[cached(memory = MEMORY)]
async fn fails_once(x: u64) -> u64 {
    PANICS.bump();
    if PANICS.get() == 1 {
        panic!("first run fails");
    }
    x
}

#[test]
fn a_panicking_task_stores_nothing() {
    let caught = std::panic::catch_unwind(|| pollster::block_on(fails_once(3)));
    assert!(caught.is_err());
    assert_eq!(pollster::block_on(fails_once(3)), 3);
    assert_eq!(pollster::block_on(fails_once(3)), 3);
    assert_eq!(PANICS.get(), 2);
}
