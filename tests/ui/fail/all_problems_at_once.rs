use memo::prelude::*;

#[cached]
async fn f<T>(a: &mut u8, b: impl Clone, c: T) -> u8 {
    let _ = (b, c);
    *a
}

fn main() {}
