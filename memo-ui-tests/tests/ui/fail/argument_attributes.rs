use memo::prelude::*;

#[cached]
fn conditional(#[cfg(any())] hidden: u64, x: u64) -> u64 {
    x
}

#[cached]
fn allowed(#[allow(unused_variables)] x: u64) -> u64 {
    1
}

fn main() {}
