use memo::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
static CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached]
fn square(x: u64) -> u64 {
    CALLS.fetch_add(1, Ordering::SeqCst);
    x * x
}

#[test]
fn smoke() {
    std::env::set_var(
        "MEMO_DIR",
        std::env::temp_dir().join(format!("memo-smoke-{}", std::process::id())),
    );
    assert_eq!(square(3), 9);
    assert_eq!(square(3), 9);
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    assert!(square::is_cached(3));
    println!("{:?}", square::location());
}
