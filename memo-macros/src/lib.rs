//! The `#[cached]` attribute of [memo](https://docs.rs/memo). Users depend on `memo`, which
//! re-exports it; see its documentation for the attribute's options.
//!
//! The crate parses the attribute into a typed model (module `args`), validates it against the
//! function's signature (`validate`), and expands from the validated model (`expand`). It does
//! no I/O.

mod args;
mod expand;
mod track;
mod validate;
mod version;

use proc_macro::TokenStream;

/// Caches a function's results on disk, keyed by its arguments; see the `memo` crate.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(args.into(), item.into()).into()
}

/// Records a helper's version for `#[cached(deps(helper))]`; see the `memo` crate.
#[proc_macro_attribute]
pub fn track(args: TokenStream, item: TokenStream) -> TokenStream {
    track::track(args.into(), item.into()).into()
}
