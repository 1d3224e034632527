#![deny(warnings)]
// Every option of the attribute, in every accepted form.

use std::sync::LazyLock;

use memo::prelude::*;

static MY_MEMORY: LazyLock<Memory> =
    LazyLock::new(|| Memory::new(std::env::temp_dir().join("memo-ui-options")));

#[cached(crate = ::memo, version = "2")]
fn versioned(x: u8) -> u8 {
    x
}

#[cached(version = 3, memory = MY_MEMORY)]
fn in_my_memory(x: u8) -> u8 {
    x
}

#[cached(memory = &*MY_MEMORY)]
fn by_reference(x: u8) -> u8 {
    x
}

fn main() {
    std::env::set_var("MEMO_DIR", std::env::temp_dir().join("memo-ui-options-default"));
    assert_eq!(versioned(1), 1);
    assert_eq!(in_my_memory(2), 2);
    assert_eq!(by_reference(3), 3);
    let mine = MY_MEMORY.location().unwrap();
    assert!(in_my_memory::location().unwrap().starts_with(mine));
    assert!(by_reference::location().unwrap().starts_with(mine));
    assert!(!versioned::location().unwrap().starts_with(mine));
}
