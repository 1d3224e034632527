#![deny(warnings)]
// Bodies that are a single expression (with or without a tail) compile without any lint.

use memo::prelude::*;

#[cached]
fn square(x: u64) -> u64 { x * x }

#[cached]
fn nothing(x: u8) {}

#[cached]
fn constant() -> u64 {
    42
}

#[cached]
fn early(x: i32) -> i32 {
    if x < 0 {
        return 0;
    }
    x
}

fn main() {
    std::env::set_var("MEMO_DIR", std::env::temp_dir().join("memo-ui-one-expression"));
    assert_eq!(square(3), 9);
    nothing(1);
    assert_eq!(constant(), 42);
    assert_eq!(early(-4), 0);
    assert_eq!(early(4), 4);
}
