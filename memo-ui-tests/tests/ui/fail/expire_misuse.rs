use memo::prelude::*;

#[cached(expire = "seven days")]
fn weekly(x: u64) -> u64 {
    x
}

fn main() {}
