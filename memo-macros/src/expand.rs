//! Expansion: reads only the validated model and builds the output from small pieces.
//!
//! For `#[cached] fn name(params) -> R { body }` the output is:
//! - `fn name(params) -> R`, with the user's attributes and signature, calling `name::__memo_call`;
//! - `struct name {}` (type namespace, so it does not clash with the function) whose associated
//!   functions are the function's cache handle: `name::clear()`, `name::is_cached(args)`,
//!   `name::call_uncached(args)`, `name::recompute(args)`, `name::location()`, `name::version()`;
//! - in its `impl`, the hidden `__memo_call` holding the body in a closure, and
//!   `__memo_function`, the function's `static` run-time state.
//!
//! Every path is absolute (`::core`, `<crate>::__private`), and every generated local or item
//! carries the `__memo_` prefix.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Attribute, ItemFn, ReturnType, Type};

use crate::args::Args;
use crate::validate::{result_ok_type, validate, CachedFn, Param};
use crate::version::{source_text, version_hash};

/// The attribute's entry point: any error becomes `compile_error!` next to the user's function,
/// unchanged, so the rest of their crate still type-checks.
pub(crate) fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut item: ItemFn = match syn::parse2(item.clone()) {
        Ok(item) => item,
        Err(_) => {
            const MESSAGE: &str = "#[cached] applies to functions (`fn name(args) -> T { ... }`)";
            let error = match syn::parse2::<syn::Item>(item.clone()) {
                Ok(other) => syn::Error::new_spanned(other, MESSAGE),
                Err(_) => syn::Error::new(Span::call_site(), MESSAGE),
            };
            return with_error(error, item);
        }
    };
    let args: Args = match syn::parse2(args) {
        Ok(args) => args,
        Err(error) => return with_error(error, item.into_token_stream()),
    };
    // The body moves into a closure: its inner attributes (`#![allow(..)]`, `//!`) go on the
    // function, where they mean the same.
    for attr in &mut item.attrs {
        attr.style = syn::AttrStyle::Outer;
    }
    match validate(&item, &args) {
        Ok(signature) => expand(&CachedFn {
            item,
            args,
            signature,
        }),
        Err(error) => with_error(error, item.into_token_stream()),
    }
}

fn with_error(error: syn::Error, item: TokenStream) -> TokenStream {
    let error = error.into_compile_error();
    quote!(#error #item)
}

/// The tokens shared by the pieces of one expansion.
struct Names<'a> {
    model: &'a CachedFn,
    /// `<crate>::__private`
    private: TokenStream,
    /// The return type (`()` when none is written).
    output: Type,
}

fn expand(model: &CachedFn) -> TokenStream {
    let krate = match &model.args.krate {
        Some(path) => path.to_token_stream(),
        None => quote!(::memo),
    };
    let output = match &model.item.sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let names = Names {
        model,
        private: quote!(#krate::__private),
        output,
    };
    if model.signature.associated {
        return associated_fn(&names);
    }
    let function = public_fn(&names);
    let handle = handle(&names);
    let args = &model.args;
    let own = version_hash(&model.item, args.version.as_deref(), &args.keying());
    let node = node_fn(&names.private, &model.item, &own, args.deps.as_ref());
    quote!(#function #handle #node)
}

/// A function in an `impl` block (inherent or trait): no item can be added beside it, so the
/// run-time state is a `static` in its body, the key includes `Self` (and the receiver, unless
/// ignored), and the body runs in a closure as for free functions. There is no handle.
fn associated_fn(names: &Names<'_>) -> TokenStream {
    let model = names.model;
    let item = &model.item;
    let private = &names.private;
    let attrs = &item.attrs;
    let vis = &item.vis;
    let mut sig = item.sig.clone();
    let receiver = sig.inputs.iter().find_map(|input| match input {
        syn::FnArg::Receiver(receiver) => Some(receiver.clone()),
        syn::FnArg::Typed(_) => None,
    });
    let inputs = bound_params(&model.signature.params);
    let receiver_input = receiver.as_ref().map(|r| quote!(#r,));
    sig.inputs = syn::parse_quote!(#receiver_input #(#inputs),*);
    let memory = memory(names);
    let key = key(names, quote!(#private::CallMode::Cached));
    let state = function_state(names);
    let call = compute_call(names, quote!(#private::CallMode::Cached));
    quote! {
        #(#attrs)*
        #vis #sig {
            #state
            let __memo_function: &'static #private::CachedFunction = &__MEMO_FUNCTION;
            #memory
            #key
            #call
        }
    }
}

/// Attributes that must also govern the generated items: conditional compilation and lints.
pub(crate) fn shared_attrs(attrs: &[Attribute], lints: bool) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| {
            let path = attr.path();
            path.is_ident("cfg")
                || path.is_ident("cfg_attr")
                || (lints
                    && ["allow", "warn", "deny", "forbid", "expect"]
                        .iter()
                        .any(|lint| path.is_ident(lint)))
        })
        .collect()
}

/// `name: Type` for each parameter, without `mut` (which is not part of a signature).
fn plain_params(params: &[Param]) -> Vec<TokenStream> {
    params
        .iter()
        .map(|Param { binding, ty, .. }| quote!(#binding: #ty))
        .collect()
}

/// `mut name: Type` for each parameter, as the body binds them.
fn bound_params(params: &[Param]) -> Vec<TokenStream> {
    params
        .iter()
        .map(|param| {
            let Param { binding, ty, .. } = param;
            let mutability = param.mutable.then(|| quote!(mut));
            quote!(#mutability #binding: #ty)
        })
        .collect()
}

fn bindings(params: &[Param]) -> Vec<&syn::Ident> {
    params.iter().map(|param| &param.binding).collect()
}

/// Calls `__memo_call` in the given mode with the parameters, inside `unsafe` for an
/// `unsafe fn`.
fn call_body(names: &Names<'_>, mode: &str) -> TokenStream {
    let private = &names.private;
    let name = &names.model.item.sig.ident;
    let mode = syn::Ident::new(mode, Span::call_site());
    let args = bindings(&names.model.signature.params);
    let turbofish = turbofish(&names.model.item.sig.generics);
    let call = quote!(#name::__memo_call #turbofish (#private::CallMode::#mode, #(#args),*));
    let call = match names.model.item.sig.unsafety {
        Some(_) => quote!(unsafe { #call }),
        None => call,
    };
    match names.model.item.sig.asyncness {
        Some(_) => quote!(#call.await),
        None => call,
    }
}

/// `::<T, N>` naming the type and const parameters (lifetimes are inferred), or nothing.
fn turbofish(generics: &syn::Generics) -> TokenStream {
    let params: Vec<&syn::Ident> = generics
        .params
        .iter()
        .filter_map(|param| match param {
            syn::GenericParam::Type(ty) => Some(&ty.ident),
            syn::GenericParam::Const(c) => Some(&c.ident),
            syn::GenericParam::Lifetime(_) => None,
        })
        .collect();
    if params.is_empty() {
        TokenStream::new()
    } else {
        quote!(::<#(#params),*>)
    }
}

/// How the result is stored: `Plain`, `OkOnly` for a `Result` (unless `store_errors`), or
/// `SomeOnly` with `skip_none`.
fn policy(names: &Names<'_>) -> TokenStream {
    let private = &names.private;
    let args = &names.model.args;
    if args.skip_none.is_some() {
        quote!(#private::SomeOnly)
    } else if args.store_errors.is_none() && result_ok_type(&names.output).is_some() {
        quote!(#private::OkOnly)
    } else {
        quote!(#private::Plain)
    }
}

/// The user's function, with its attributes, name and signature; its body calls `__memo_call`.
fn public_fn(names: &Names<'_>) -> TokenStream {
    let item = &names.model.item;
    // An expected lint is expected where the body went (`__memo_call`): here it is allowed.
    let attrs = item.attrs.iter().map(|attr| match &attr.meta {
        syn::Meta::List(list) if list.path.is_ident("expect") => {
            let lints = &list.tokens;
            quote_spanned!(attr.span()=> #[allow(#lints)])
        }
        _ => attr.to_token_stream(),
    });
    let vis = &item.vis;
    let mut sig = item.sig.clone();
    let params = plain_params(&names.model.signature.params);
    sig.inputs = syn::parse_quote!(#(#params),*);
    let body = call_body(names, "Cached");
    quote! {
        #(#attrs)*
        #vis #sig {
            #body
        }
    }
}

/// Statements binding `__memo_memory` to the cache this function uses.
fn memory(names: &Names<'_>) -> TokenStream {
    let private = &names.private;
    match &names.model.args.memory {
        None => quote!(let __memo_memory: &#private::Memory = #private::Memory::global();),
        Some(expr) => quote_spanned! {expr.span()=>
            let __memo_memory_owner = &(#expr);
            let __memo_memory: &#private::Memory =
                #private::AsMemory::as_memory(__memo_memory_owner);
        },
    }
}

/// Statements binding `__memo_key` to the call's key (or `None`): the `key = ...` expression, or
/// every parameter not ignored; and the concrete type and const parameters of a generic function.
/// When the parameters alone are keyed, they are first written into a short key directly
/// (`ShortArgs`), which serves when all are primitive values; else they go through serde.
fn key(names: &Names<'_>, mode: TokenStream) -> TokenStream {
    let private = &names.private;
    let hash = |value: TokenStream, span: Span| {
        // Spanned at the user's code, so a value that is not `Serialize` is reported there.
        quote_spanned!(span=> #private::hash_arg(__memo_hasher, #value);)
    };
    let mut parts: Vec<TokenStream> = Vec::new();
    for param in &names.model.item.sig.generics.params {
        match param {
            syn::GenericParam::Type(ty) => {
                let ident = &ty.ident;
                parts.push(hash(
                    quote!(::core::any::type_name::<#ident>()),
                    ident.span(),
                ));
            }
            syn::GenericParam::Const(c) => {
                let ident = &c.ident;
                parts.push(hash(quote!(&#ident), ident.span()));
            }
            syn::GenericParam::Lifetime(_) => {}
        }
    }
    if names.model.signature.associated {
        // `A::new` and `B::new` of one module share a name, and so do `convert` of
        // `impl<U> Convert<U> for Model` for every `U`: the name of a closure's type here
        // spells the function's full path, `<Model as Convert<Feet>>::convert::{{closure}}`,
        // with the impl's type and trait, and their parameters, which the attribute cannot see.
        parts.push(hash(
            quote!(::core::any::type_name_of_val(&|| ())),
            names.model.item.sig.ident.span(),
        ));
    }
    if let Some(receiver) = &names.model.signature.receiver {
        if !receiver.ignored && names.model.args.key.is_none() {
            let span = names
                .model
                .item
                .sig
                .inputs
                .first()
                .map_or_else(Span::call_site, |input| input.span());
            parts.push(hash(quote_spanned!(span=> &self), span));
        }
    }
    match &names.model.args.key {
        Some(expr) => parts.push(hash(quote!(&(#expr)), expr.span())),
        None => {
            for Param { binding, ty, .. } in keyed_params(names) {
                // A slice or `Vec` of numbers is hashed as raw bytes, anything else through
                // serde: method resolution on the declared type picks (see `__private::Arg`).
                parts.push(quote_spanned! {ty.span()=>
                    {
                        #[allow(unused_imports)]
                        use #private::{NumbersArg as _, SerdeArg as _};
                        (&#private::Arg(&#binding)).hash_into(__memo_hasher);
                    }
                });
            }
        }
    }
    // Arguments hashed in place (not a `key = ...` expression, which may move them) can be
    // hashed again: large slices of floats are then hashed without a look for NaNs first (see
    // `CachedFunction::key_checked`). Not in an `async fn`, whose look-up waits on a thread pool.
    let hash = if names.model.args.key.is_none() && names.model.item.sig.asyncness.is_none() {
        quote!(key_checked)
    } else {
        quote!(key)
    };
    let hashed = quote! {
        __memo_function.#hash(__memo_memory, #mode, |__memo_hasher| {
            #(#parts)*
        })
    };
    if names.model.args.key.is_some() || parts.len() != keyed_params(names).count() {
        // A `key = ...` expression, type names, `self` or the function's path: through serde.
        return quote!(let __memo_key = #hashed;);
    }
    // Parameters that are all primitive values are written straight into a short key (method
    // resolution on each declared type picks `ShortArg`, or else `OtherShortArg`, which sends
    // the call through the hasher): the same key, without the serializer.
    let short = keyed_params(names).map(|Param { binding, ty, .. }| {
        quote_spanned! {ty.span()=>
            {
                #[allow(unused_imports)]
                use #private::{OtherShortArg as _, ShortArg as _};
                (&#private::Arg(&#binding)).short_into(&mut __memo_short);
            }
        }
    });
    quote! {
        let __memo_key = {
            let mut __memo_short = #private::ShortArgs::new();
            #(#short)*
            __memo_function.key_short(__memo_memory, #mode, __memo_short, || #hashed)
        };
    }
}

/// The parameters a call is keyed by, without a `key = ...` expression: those not ignored.
fn keyed_params<'a>(names: &'a Names<'_>) -> impl Iterator<Item = &'a Param> + 'a {
    names.model.signature.params.iter().filter(|p| !p.ignored)
}

/// The struct sharing the function's name and its `impl`: the cache handle and the hidden items.
fn handle(names: &Names<'_>) -> TokenStream {
    let model = names.model;
    let item = &model.item;
    let vis = &item.vis;
    let name = &item.sig.ident;
    let cfgs = shared_attrs(&item.attrs, false);
    let struct_doc = format!(
        "Cache controls of [`{name}`](fn@{name}), which is `#[cached]`: \
         `{name}::clear()`, `{name}::clear_stale()`, `{name}::is_cached(..)`, \
         `{name}::call_uncached(..)`, \
         `{name}::recompute(..)`, `{name}::location()` and `{name}::version()`."
    );
    let call = hidden_call(names);
    let function = function_static(names);
    let methods = handle_methods(names);
    quote! {
        #(#cfgs)*
        #[doc = #struct_doc]
        #[allow(non_camel_case_types, dead_code)]
        #vis struct #name {}

        #(#cfgs)*
        #[allow(dead_code, clippy::needless_lifetimes, clippy::too_many_arguments)]
        impl #name {
            #call
            #function
            #methods
        }
    }
}

/// Runs the body (in a closure) through the cache, with `__memo_function`, `__memo_memory` and
/// `__memo_key` in scope.
fn compute_call(names: &Names<'_>, mode: TokenStream) -> TokenStream {
    let private = &names.private;
    let output = &names.output;
    let destructure = names.model.signature.params.iter().filter_map(|param| {
        let pattern = param.pattern.as_ref()?;
        let binding = &param.binding;
        Some(quote!(let #pattern = #binding;))
    });
    let body = &names.model.item.block.stmts;
    let policy = policy(names);
    let preview = preview(names);
    let (call, block) = match names.model.item.sig.asyncness {
        Some(_) => (quote!(call_async), quote!(async move)),
        None => (quote!(call), quote!(move || -> #output)),
    };
    let awaited = names.model.item.sig.asyncness.map(|_| quote!(.await));
    quote_spanned! {output.span()=>
        {
            let __memo_preview = ::std::sync::OnceLock::<::std::string::String>::new();
            let __memo_preview_slot = &__memo_preview;
            // A `Vec` of numbers is stored as raw bytes, anything else as MessagePack: method
            // resolution on the stored type picks (the `&` lets it try `NumbersCodec` first).
            #[allow(clippy::needless_borrow)]
            let __memo_codec = {
                #[allow(unused_imports)]
                use #private::{NumbersCodec as _, SerdeCodec as _};
                (&#private::CodecFor::<<#policy as #private::StorePolicy<#output>>::Stored>::NEW)
                    .codec()
            };
            #private::CachedFunction::#call::<#output, #policy, _>(
                __memo_function,
                __memo_memory,
                #mode,
                __memo_key,
                &__memo_preview,
                __memo_codec,
                #block {
                    #preview
                    #(#destructure)*
                    #(#body)*
                },
            )
            #awaited
        }
    }
}

/// Fills `__memo_preview_slot` with a short `Debug` form of the keyed arguments: run at the start
/// of the computation, so only misses pay for it.
fn preview(names: &Names<'_>) -> TokenStream {
    let private = &names.private;
    let parts = names
        .model
        .signature
        .params
        .iter()
        .filter(|param| !param.ignored)
        .enumerate()
        .map(|(i, param)| {
            let binding = &param.binding;
            let separator = (i > 0).then(|| quote!(__memo_text.push_str(", ");));
            quote! {
                #separator
                (&&&#private::Preview(&#binding)).memo_preview(&mut __memo_text);
            }
        });
    quote! {
        // The `&`s before `Preview` are what let method resolution pick `PreviewSeq`, else
        // `PreviewDebug`, else `PreviewNone`.
        #[allow(clippy::needless_borrow)]
        __memo_preview_slot.get_or_init(|| {
            #[allow(unused_imports)]
            use #private::{PreviewDebug as _, PreviewNone as _, PreviewSeq as _};
            #[allow(unused_mut)]
            let mut __memo_text = ::std::string::String::new();
            #(#parts)*
            __memo_text
        });
    }
}

/// `__memo_call`: keys the call and runs the body (in a closure) through the cache.
fn hidden_call(names: &Names<'_>) -> TokenStream {
    let model = names.model;
    let item = &model.item;
    let private = &names.private;
    let vis = &item.vis;
    let unsafety = &item.sig.unsafety;
    let asyncness = &item.sig.asyncness;
    let generics = &item.sig.generics;
    let where_clause = &generics.where_clause;
    let output = &names.output;
    let lints = shared_attrs(&item.attrs, true);
    let inputs = bound_params(&model.signature.params);
    let memory = memory(names);
    let key = key(names, quote!(__memo_mode));
    let call = compute_call(names, quote!(__memo_mode));
    quote! {
        #[doc(hidden)]
        #[inline]
        #(#lints)*
        #vis #unsafety #asyncness fn __memo_call #generics (
            __memo_mode: #private::CallMode,
            #(#inputs),*
        ) -> #output #where_clause {
            #memory
            let __memo_function = Self::__memo_function();
            #key
            #call
        }
    }
}

/// The `static __MEMO_FUNCTION`: the function's run-time state, built from compile-time facts.
fn function_state(names: &Names<'_>) -> TokenStream {
    let item = &names.model.item;
    let private = &names.private;
    let name = item.sig.ident.to_string();
    let args = &names.model.args;
    let mut options = args.keying();
    if names.model.signature.associated {
        // Their keys name the impl (see `key`) since 2026-12: a version of its own, so that the
        // entries keyed the old way are another version's, which `clear_stale` and gc remove.
        options.push_str("keyed by impl path ");
    }
    let version = version_hash(item, args.version.as_deref(), &options);
    let source = source_text(item);
    let deps = dep_nodes(private, args.deps.as_ref());
    let expire_after = match args.expire {
        Some(duration) => {
            let (secs, nanos) = (duration.as_secs(), duration.subsec_nanos());
            quote!(::core::option::Option::Some(::core::time::Duration::new(#secs, #nanos)))
        }
        None => quote!(::core::option::Option::None),
    };
    let compression = match args.compress {
        None => quote!(#private::Compression::Inherit),
        Some((_, None)) => quote!(#private::Compression::Off),
        Some((_, Some(level))) => quote!(#private::Compression::Level(#level)),
    };
    let validate = match &args.validate {
        Some(path) => quote_spanned! {path.span()=>
            ::core::option::Option::Some(#path as fn(&#private::EntryMeta) -> ::core::primitive::bool)
        },
        None => quote!(::core::option::Option::None),
    };
    quote! {
        static __MEMO_FUNCTION: #private::CachedFunction =
            #private::CachedFunction::new(#private::FunctionDef {
                module_path: ::core::module_path!(),
                name: #name,
                version: #version,
                source: #source,
                deps: #deps,
                freshness: #private::Freshness {
                    expire_after: #expire_after,
                    validate: #validate,
                },
                compression: #compression,
            });
    }
}

/// The `deps(...)` functions as a static slice of their node functions: `m::helper` becomes
/// `m::__memo_node_helper`, spanned at the user's name so that an untracked dependency is
/// reported there.
fn dep_nodes(private: &TokenStream, deps: Option<&(Span, Vec<syn::Path>)>) -> TokenStream {
    let nodes = deps.into_iter().flat_map(|(_, paths)| paths).map(|path| {
        let mut node = path.clone();
        if let Some(last) = node.segments.last_mut() {
            last.ident =
                quote::format_ident!("__memo_node_{}", last.ident, span = last.ident.span());
        }
        quote_spanned!(path.span()=> #node as fn() -> &'static #private::DepNode)
    });
    quote!(&[#(#nodes),*])
}

/// `__memo_node_<name>`: the function's node for the functions that name it in `deps(...)`.
pub(crate) fn node_fn(
    private: &TokenStream,
    item: &ItemFn,
    own: &str,
    deps: Option<&(Span, Vec<syn::Path>)>,
) -> TokenStream {
    let vis = &item.vis;
    let name = &item.sig.ident;
    let node = quote::format_ident!("__memo_node_{}", name);
    let label = name.to_string();
    let deps = dep_nodes(private, deps);
    let cfgs = shared_attrs(&item.attrs, false);
    quote! {
        #(#cfgs)*
        #[doc(hidden)]
        #[allow(non_snake_case, dead_code)]
        #vis fn #node() -> &'static #private::DepNode {
            static __MEMO_NODE: #private::DepNode = #private::DepNode {
                name: ::core::concat!(::core::module_path!(), "::", #label),
                own: #own,
                deps: #deps,
            };
            &__MEMO_NODE
        }
    }
}

/// `__memo_function`: returns the function's run-time state.
fn function_static(names: &Names<'_>) -> TokenStream {
    let vis = &names.model.item.vis;
    let private = &names.private;
    let state = function_state(names);
    quote! {
        #[doc(hidden)]
        #vis fn __memo_function() -> &'static #private::CachedFunction {
            #state
            &__MEMO_FUNCTION
        }
    }
}

/// The public cache handle: joblib's `func.clear()`, `check_call_in_cache`, `func.call`.
fn handle_methods(names: &Names<'_>) -> TokenStream {
    let model = names.model;
    let item = &model.item;
    let private = &names.private;
    let vis = &item.vis;
    let name = &item.sig.ident;
    let unsafety = &item.sig.unsafety;
    let asyncness = &item.sig.asyncness;
    let generics = &item.sig.generics;
    let where_clause = &generics.where_clause;
    let output = &names.output;
    let params = plain_params(&model.signature.params);
    let all_bindings = bindings(&model.signature.params);
    let memory = memory(names);
    let key = key(names, quote!(#private::CallMode::Cached));
    let uncached = call_body(names, "Uncached");
    let refresh = call_body(names, "Refresh");
    let doc = |text: String| quote!(#[doc = #text]);
    let clear_doc = doc(format!(
        "Removes every stored result of [`{name}`](fn@{name}), of all its versions."
    ));
    let is_cached_doc = doc(format!(
        "Whether the result of [`{name}`](fn@{name}) for these arguments is stored, intact \
         (key and checksum verified) and fresh (not expired)."
    ));
    let clear_stale_doc = doc(format!(
        "Removes the stored results of every version of [`{name}`](fn@{name}) but the one \
         compiled in now."
    ));
    let uncached_doc = doc(format!(
        "Runs [`{name}`](fn@{name}) without the cache: nothing is read or stored."
    ));
    let refresh_doc = doc(format!(
        "Runs [`{name}`](fn@{name}) and stores its result, replacing a stored one."
    ));
    let location_doc = doc(format!(
        "The folder holding the stored results of this version of [`{name}`](fn@{name}), or \
         `None` when its cache is disabled."
    ));
    let version_doc = doc(format!(
        "The version hash of [`{name}`](fn@{name}): BLAKE3 of its tokens and of its \
         dependencies' versions, 64 hex digits."
    ));
    quote! {
        #clear_doc
        #vis fn clear() -> ::core::result::Result<(), #private::Error> {
            #memory
            Self::__memo_function().clear(__memo_memory)
        }

        #clear_stale_doc
        #vis fn clear_stale() -> ::core::result::Result<(), #private::Error> {
            #memory
            Self::__memo_function().clear_stale(__memo_memory)
        }

        #is_cached_doc
        #vis fn is_cached #generics (#(#params),*) -> ::core::primitive::bool #where_clause {
            // Ignored arguments, or all of them with `key = ...`, take no part here.
            #(let _ = &#all_bindings;)*
            #memory
            let __memo_function = Self::__memo_function();
            #key
            __memo_function.is_cached(__memo_memory, __memo_key)
        }

        #uncached_doc
        #vis #unsafety #asyncness fn call_uncached #generics (#(#params),*) -> #output #where_clause {
            #uncached
        }

        #refresh_doc
        #vis #unsafety #asyncness fn recompute #generics (#(#params),*) -> #output #where_clause {
            #refresh
        }

        #location_doc
        #vis fn location() -> ::core::option::Option<::std::path::PathBuf> {
            #memory
            Self::__memo_function().location(__memo_memory)
        }

        #version_doc
        #vis fn version() -> &'static ::core::primitive::str {
            Self::__memo_function().version()
        }
    }
}
