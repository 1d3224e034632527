use memo::prelude::*;

struct Opaque;

impl Opaque {
    #[cached]
    fn value(&self, x: u64) -> u64 {
        x
    }
}

fn main() {}
