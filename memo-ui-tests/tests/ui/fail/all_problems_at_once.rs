use memo::prelude::*;

#[cached(ignore(missing))]
const fn f(a: &mut u8, _b: impl Copy, _c: Option<&mut String>) -> u8 {
    *a
}

fn main() {}
