//! `#[memo::track]`: records a helper's version so that `#[cached(deps(helper))]` functions are
//! invalidated when it changes. The helper itself is emitted unchanged; nothing is cached.

use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::spanned::Spanned;
use syn::ItemFn;

use crate::args::Args;
use crate::expand::node_fn;
use crate::version::version_hash;

pub(crate) fn track(args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed: ItemFn = match syn::parse2(item.clone()) {
        Ok(parsed) => parsed,
        Err(_) => {
            let error = syn::Error::new(
                Span::call_site(),
                "#[memo::track] applies to functions (`fn name(args) -> T { ... }`)",
            );
            return with_error(error, item);
        }
    };
    let args: Args = match syn::parse2(args) {
        Ok(args) => args,
        Err(error) => return with_error(error, item),
    };
    if let Err(error) = check(&parsed, &args) {
        return with_error(error, item);
    }
    let krate = match &args.krate {
        Some(path) => path.to_token_stream(),
        None => quote!(::memo),
    };
    let private = quote!(#krate::__private);
    let own = version_hash(&parsed, args.version.as_deref(), "");
    let node = node_fn(&private, &parsed, &own, args.deps.as_ref());
    quote!(#parsed #node)
}

fn with_error(error: syn::Error, item: TokenStream) -> TokenStream {
    let error = error.into_compile_error();
    quote!(#error #item)
}

/// `#[memo::track]` takes `deps(...)`, `version` and `crate`, on free functions only.
fn check(item: &ItemFn, args: &Args) -> syn::Result<()> {
    const ONLY: &str = "#[memo::track] takes only `deps(...)`, `version = \"...\"` and \
                        `crate = path`: it records a version, it caches nothing";
    let mut misplaced: Vec<Span> = Vec::new();
    misplaced.extend(args.memory.as_ref().map(Spanned::span));
    misplaced.extend(args.key.as_ref().map(Spanned::span));
    misplaced.extend(args.ignore.as_ref().map(|(span, _)| *span));
    misplaced.extend(args.store_errors);
    misplaced.extend(args.skip_none);
    misplaced.extend(args.associated);
    misplaced.extend(args.validate.as_ref().map(Spanned::span));
    misplaced.extend(args.compress.map(|(span, _)| span));
    if args.expire.is_some() {
        misplaced.push(Span::call_site());
    }
    if let Some(span) = misplaced.first() {
        return Err(syn::Error::new(*span, ONLY));
    }
    if let Some(syn::FnArg::Receiver(receiver)) = item.sig.inputs.first() {
        return Err(syn::Error::new_spanned(
            receiver,
            "#[memo::track] applies to free functions: a method cannot be named in `deps(...)`",
        ));
    }
    Ok(())
}
