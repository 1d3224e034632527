use memo::prelude::*;

#[cached(memory = 5)]
fn f(x: u64) -> u64 {
    x
}

fn main() {}
