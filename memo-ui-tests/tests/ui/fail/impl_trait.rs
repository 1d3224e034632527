use memo::prelude::*;

#[cached]
fn f(x: impl serde::Serialize) -> impl std::fmt::Display {
    let _ = x;
    1
}

fn main() {}
