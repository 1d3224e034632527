use memo::prelude::*;

#[memo::track(ignore(x))]
fn misused(x: u64) -> u64 {
    x
}

struct Model;

impl Model {
    #[memo::track]
    fn method(&self) -> u64 {
        1
    }
}

fn main() {}
