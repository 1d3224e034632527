#![deny(warnings)]
//! Bodies the expansion carries over as they are: inner attributes, `Self` of an `impl` declared
//! inside, items that syn keeps as raw tokens.

use memo::prelude::*;

/// An inner attribute of the body governs the function.
#[cached]
fn with_an_inner_attribute(x: u64) -> u64 {
    #![allow(unused_variables)]
    let unused = 1;
    x
}

/// `Self` in an `impl` declared inside the body is that impl's: still a free function.
#[cached]
fn with_a_local_impl(x: u64) -> u64 {
    struct Twice(u64);
    impl Twice {
        fn new(x: u64) -> Self {
            Twice(2 * x)
        }
    }
    Twice::new(x).0
}

/// A foreign block (raw tokens to syn) in the body, recorded in the version's source text too.
#[cached]
fn with_a_foreign_block(x: f64) -> f64 {
    unsafe extern "C" {
        safe fn sqrt(x: f64) -> f64;
    }
    sqrt(x)
}

fn main() {
    std::env::set_var("MEMO_DIR", std::env::temp_dir().join("memo-ui-bodies"));
    assert_eq!(with_an_inner_attribute(3), 3);
    assert_eq!(with_a_local_impl(4), 8);
    assert_eq!(with_a_foreign_block(9.0), 3.0);
    with_a_local_impl::clear().unwrap();
}
