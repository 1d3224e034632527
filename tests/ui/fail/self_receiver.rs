use memo::prelude::*;

struct Model;

impl Model {
    #[cached]
    fn predict(&self, x: u64) -> u64 {
        x
    }
}

fn main() {}
