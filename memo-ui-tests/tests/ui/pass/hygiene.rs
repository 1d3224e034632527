#![deny(warnings)]
// Names users may well have in scope, and the names generated code uses, do not collide.

use memo::prelude::*;

#[allow(dead_code)]
type Result<T> = ::core::result::Result<T, ()>;
#[allow(dead_code)]
type Option = u8;
#[allow(dead_code)]
mod core {}
#[allow(dead_code)]
mod std {}

#[cached]
fn named_like_generated(key: u64, memory: u64, hasher: u64, mode: u64, __memo_x: u64) -> u64 {
    key + memory + hasher + mode + __memo_x
}

mod a {
    use memo::prelude::*;

    #[cached]
    pub fn same(x: u8) -> u8 {
        x
    }
}

mod b {
    use memo::prelude::*;

    #[cached]
    pub fn same(x: u8) -> u8 {
        x + 1
    }
}

/// Primitive type names shadowed by the user's types.
#[allow(dead_code, non_camel_case_types)]
mod shadowed {
    use memo::prelude::*;

    struct bool;
    struct str;

    fn fresh(_: &memo::EntryMeta) -> ::core::primitive::bool {
        true
    }

    #[cached(validate = fresh)]
    pub fn checked(x: u8) -> u8 {
        x
    }
}

#[no_implicit_prelude]
mod bare {
    #[::memo::cached]
    pub fn bytes(text: ::std::string::String) -> ::std::vec::Vec<u8> {
        text.into_bytes()
    }
}

fn main() {
    ::std::env::set_var("MEMO_DIR", ::std::env::temp_dir().join("memo-ui-hygiene"));
    assert_eq!(named_like_generated(1, 2, 3, 4, 5), 15);
    // Same name, different modules: different functions, different entries.
    a::same::clear().unwrap();
    b::same::clear().unwrap();
    assert_eq!(a::same(1), 1);
    assert_eq!(b::same(1), 2);
    assert_eq!(a::same(1), 1);
    assert_ne!(a::same::location(), b::same::location());
    assert_eq!(bare::bytes("hi".into()), b"hi".to_vec());
    assert_eq!(shadowed::checked(3), 3);
    assert!(shadowed::checked::is_cached(3));
    assert_eq!(shadowed::checked::version().len(), 64);
}
