use memo::prelude::*;

fn helper(x: u64) -> u64 {
    x + 1
}

#[cached(deps(helper))]
fn f(x: u64) -> u64 {
    helper(x)
}

fn main() {}
