//! No code: this crate holds memo's compile-time tests (`tests/ui.rs` and its fixtures in
//! `tests/ui/`). They live in a crate of their own so that the project trybuild builds them in
//! depends on memo with its default features only and on nothing else of the root package's.
