use memo::prelude::*;

struct Opaque(u8);

#[cached]
fn f(x: u8) -> Opaque {
    Opaque(x)
}

fn main() {}
