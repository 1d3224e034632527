use memo::prelude::*;

#[cached]
struct Settings {
    steps: u32,
}

fn main() {}
