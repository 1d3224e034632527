use memo::prelude::*;

#[cached(compress = "high")]
fn big(x: u64) -> Vec<u64> {
    vec![x; 100]
}

#[cached(compress = 99)]
fn beyond_zstd(x: u64) -> Vec<u64> {
    vec![x; 100]
}

fn main() {}
