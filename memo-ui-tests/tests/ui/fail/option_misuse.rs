use memo::prelude::*;

#[cached(ignore(verbos))]
fn typo(steps: u64, verbose: bool) -> u64 {
    let _ = verbose;
    steps
}

#[cached(ignore(verbose, verbose))]
fn twice(steps: u64, verbose: bool) -> u64 {
    let _ = verbose;
    steps
}

#[cached(ignore(verbose), key = steps)]
fn both(steps: u64, verbose: bool) -> u64 {
    let _ = verbose;
    steps
}

#[cached(store_errors)]
fn not_a_result(x: u64) -> u64 {
    x
}

#[cached(skip_none)]
fn not_an_option(x: u64) -> Result<u64, String> {
    Ok(x)
}

fn main() {}
