use memo::prelude::*;

#[cached(version = 1.5)]
fn f(x: u64) -> u64 {
    x
}

#[cached(memory)]
fn g(x: u64) -> u64 {
    x
}

fn main() {}
