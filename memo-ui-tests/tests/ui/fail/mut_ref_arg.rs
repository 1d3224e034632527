use memo::prelude::*;

#[cached]
fn f(values: &mut Vec<u8>, also: Option<&mut String>) -> usize {
    values.push(1);
    also.map_or(0, |s| s.len()) + values.len()
}

fn main() {}
