#![deny(warnings, missing_docs)]
//! `#[cached]` on free functions of every visibility, anywhere, with other attributes.

use memo::prelude::*;
use serde::{Deserialize, Serialize};

/// A documented public function: the generated items need no documentation of their own.
#[cached]
#[inline]
#[must_use]
pub fn top(x: u64) -> u64 {
    x + 1
}

/// A module.
pub mod physics {
    use memo::prelude::*;

    /// Visible in the crate.
    #[cached]
    pub(crate) fn energy(mass: f64) -> f64 {
        mass * 299_792_458.0f64.powi(2)
    }

    #[cached]
    #[allow(clippy::needless_pass_by_value)]
    fn private(values: Vec<u8>) -> usize {
        values.len()
    }

    /// Calls the private one.
    pub fn use_private() -> usize {
        private(vec![1, 2])
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i32,
    y: i32,
}

#[cached]
fn borrowed<'a>(label: &'a str, values: &[f64], point: &Point) -> usize {
    label.len() + values.len() + (point.x + point.y) as usize
}

#[cached]
fn patterns((a, b): (u32, u32), mut n: u32) -> u32 {
    n += a * b;
    n
}

#[cached]
fn unit(x: u8) {
    let _ = x;
}

#[cached]
fn make_point(x: i32) -> Point {
    Point { x, y: -x }
}

/// An expected lint is fulfilled by the body, wherever the expansion puts it.
#[cached]
#[expect(unused_variables)]
fn expects_a_lint(x: u64) -> u64 {
    let unused = 1;
    x
}

fn main() {
    std::env::set_var("MEMO_DIR", std::env::temp_dir().join("memo-ui-pass"));
    assert_eq!(expects_a_lint(5), 5);

    #[cached]
    fn nested(x: u64) -> u64 {
        x * 2
    }
    assert_eq!(nested(2), 4);
    assert_eq!(nested::call_uncached(3), 6);

    assert_eq!(top(1), 2);
    assert!(top::is_cached(1));
    assert_eq!(top::recompute(1), 2);
    top::clear().unwrap();
    assert!(!top::is_cached(1));
    assert!(top::location().is_some());
    assert_eq!(top::version().len(), 64);

    assert!(physics::energy(1.0) > 0.0);
    assert_eq!(physics::use_private(), 2);
    assert_eq!(borrowed("ab", &[1.0], &Point { x: 1, y: 2 }), 6);
    assert_eq!(patterns((2, 3), 1), 7);
    assert!(patterns::is_cached((2, 3), 1));
    unit(1);
    assert_eq!(make_point(3), Point { x: 3, y: -3 });
}
