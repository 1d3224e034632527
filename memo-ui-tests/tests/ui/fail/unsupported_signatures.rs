use memo::prelude::*;

#[cached]
const fn constant(x: u64) -> u64 {
    x
}

#[cached]
fn unbounded<T>(x: T) -> u64 {
    let _ = x;
    1
}

fn main() {}
