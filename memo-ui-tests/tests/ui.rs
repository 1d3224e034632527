//! Compile-time behaviour of `#[cached]`: misuse is a clear error at the user's code
//! (`tests/ui/fail`), and every supported form compiles without warnings (`tests/ui/pass`).
//! The expected messages are pinned to the toolchain in `rust-toolchain.toml`; regenerate them
//! with `TRYBUILD=overwrite cargo test -p memo-ui-tests` after reviewing a change.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
    cases.pass("tests/ui/pass/*.rs");
}
