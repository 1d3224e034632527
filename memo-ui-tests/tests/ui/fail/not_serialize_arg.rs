use memo::prelude::*;

struct Opaque(u8);

#[cached]
fn f(x: Opaque) -> u8 {
    x.0
}

fn main() {}
