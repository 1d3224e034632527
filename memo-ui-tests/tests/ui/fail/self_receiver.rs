use memo::prelude::*;

struct Model;

impl Model {
    #[cached]
    fn train(&mut self, x: u64) -> u64 {
        x
    }

    #[cached]
    fn boxed(self: Box<Self>, x: u64) -> u64 {
        x
    }
}

#[cached(ignore(self))]
fn free(x: u64) -> u64 {
    x
}

fn main() {}
