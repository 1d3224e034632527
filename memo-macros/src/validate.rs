//! Validation of the function against what `#[cached]` supports, producing the model that
//! expansion reads. Every problem is collected, so one compile shows them all.

use proc_macro2::Span;
use quote::format_ident;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, Ident, ItemFn, Pat, ReturnType, Type};

use crate::args::Args;

/// A function `#[cached]` can expand.
pub(crate) struct CachedFn {
    pub item: ItemFn,
    pub args: Args,
    pub signature: Checked,
}

/// What validation learned about a function's signature.
pub(crate) struct Checked {
    pub params: Vec<Param>,
    /// `&self` or `self`, and whether it is ignored.
    pub receiver: Option<ReceiverUse>,
    /// In an `impl` block (a receiver, `Self` in the code, or the `associated` option): the
    /// whole expansion goes inside the function body.
    pub associated: bool,
}

/// How a method takes its receiver.
pub(crate) struct ReceiverUse {
    pub ignored: bool,
}

/// Whether the tokens mention `Self`.
fn mentions_self(tokens: proc_macro2::TokenStream) -> bool {
    tokens.into_iter().any(|token| match token {
        proc_macro2::TokenTree::Ident(ident) => ident == "Self",
        proc_macro2::TokenTree::Group(group) => mentions_self(group.stream()),
        _ => false,
    })
}

/// Whether a function body mentions `Self` outside the `impl` and `trait` blocks declared in it
/// (their `Self` is theirs).
fn body_mentions_self(tokens: proc_macro2::TokenStream) -> bool {
    let mut in_item = false;
    tokens.into_iter().any(|token| match token {
        proc_macro2::TokenTree::Ident(ident) if ident == "impl" || ident == "trait" => {
            in_item = true;
            false
        }
        proc_macro2::TokenTree::Group(group)
            if in_item && group.delimiter() == proc_macro2::Delimiter::Brace =>
        {
            in_item = false;
            false
        }
        _ if in_item => false,
        proc_macro2::TokenTree::Ident(ident) => ident == "Self",
        proc_macro2::TokenTree::Group(group) => body_mentions_self(group.stream()),
        _ => false,
    })
}

/// One parameter of the function.
pub(crate) struct Param {
    /// The name it has in generated code: the user's name for a plain `name: Type` parameter,
    /// `__memo_argN` for a pattern.
    pub binding: Ident,
    /// `mut` on a plain parameter.
    pub mutable: bool,
    /// The user's pattern, when it is not a plain name: destructured inside the body.
    pub pattern: Option<Pat>,
    pub ty: Type,
    /// Named in `ignore(...)`: left out of the key.
    pub ignored: bool,
}

/// Collects errors so that they can be reported together.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, span: Span, message: impl std::fmt::Display) {
        self.add(syn::Error::new(span, message));
    }

    /// An error covering all of `tokens`, from their first to their last span.
    fn push_spanned(&mut self, tokens: impl quote::ToTokens, message: impl std::fmt::Display) {
        self.add(syn::Error::new_spanned(tokens, message));
    }

    fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }
}

/// Finds what a parameter type may not contain: `&mut` and `impl Trait`.
struct TypeCheck<'a> {
    errors: &'a mut Errors,
}

impl<'ast> Visit<'ast> for TypeCheck<'_> {
    fn visit_type_reference(&mut self, ty: &'ast syn::TypeReference) {
        if ty.mutability.is_some() {
            self.errors.push_spanned(
                ty,
                "#[cached] functions cannot take `&mut` arguments: a cache hit would skip the \
                 mutation. Take the value (or a `&` reference) and return the new state instead",
            );
        }
        syn::visit::visit_type_reference(self, ty);
    }

    fn visit_type_impl_trait(&mut self, ty: &'ast syn::TypeImplTrait) {
        self.errors.push_spanned(
            ty,
            "`impl Trait` arguments are not supported by #[cached]: the key is made from the \
             argument's concrete type; use a concrete type",
        );
    }

    fn visit_type_bare_fn(&mut self, _: &'ast syn::TypeBareFn) {
        // `fn(&mut T)` borrows nothing from the caller; it fails later as not `Serialize`.
    }
}

/// The type argument `T` of a return type written `Result<T, ..>` (any path ending in `Result`,
/// such as `io::Result<T>` or `anyhow::Result<T>`).
pub(crate) fn result_ok_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(ok) => Some(ok),
        _ => None,
    }
}

/// Whether a return type is written `Option<T>` (a path ending in `Option`).
fn is_option(ty: &Type) -> bool {
    matches!(ty, Type::Path(path) if path.path.segments.last().is_some_and(|s| s.ident == "Option"))
}

/// Checks the function and its options against what `#[cached]` supports; its parameters, or
/// every problem.
pub(crate) fn validate(item: &ItemFn, args: &Args) -> Result<Checked, syn::Error> {
    let mut errors = Errors::default();
    let sig = &item.sig;
    let item_block = &item.block;
    if let Some(token) = &sig.constness {
        errors.push(
            token.span,
            "a `const fn` cannot be #[cached]: remove `const`",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(variadic.span(), "variadic functions cannot be #[cached]");
    }
    let output = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => None,
    };
    if let Some(span) = args.store_errors {
        if output.and_then(result_ok_type).is_none() {
            errors.push(
                span,
                "`store_errors` applies to functions that return a `Result`: it stores `Err` \
                 values too (by default only `Ok` values are stored)",
            );
        }
    }
    if let Some(span) = args.skip_none {
        if !output.is_some_and(is_option) {
            errors.push(
                span,
                "`skip_none` applies to functions that return an `Option`: it leaves `None` \
                 values out of the cache",
            );
        }
    }
    if let (Some((span, _)), Some(_)) = (&args.ignore, &args.key) {
        errors.push(
            *span,
            "`ignore(...)` has no effect with `key = ...`: the key is made from that expression \
             alone; remove one of them",
        );
    }
    if let ReturnType::Type(_, ty) = &sig.output {
        if contains_impl_trait(ty) {
            errors.push_spanned(
                ty,
                "#[cached] needs a concrete return type that implements `Serialize` and \
                 `DeserializeOwned`, not `impl Trait`",
            );
        }
    }
    let ignores = |name: &str| {
        args.ignore
            .as_ref()
            .is_some_and(|(_, names)| names.iter().any(|n| n == name))
    };
    let mut params = Vec::new();
    let mut receiver_use = None;
    for (index, input) in sig.inputs.iter().enumerate() {
        let attrs = match input {
            FnArg::Receiver(receiver) => &receiver.attrs,
            FnArg::Typed(typed) => &typed.attrs,
        };
        for attr in attrs {
            errors.push_spanned(
                attr,
                "#[cached] does not take attributes on arguments (a `#[cfg]` there would change \
                 which arguments are keyed): put them on the whole function",
            );
        }
        match input {
            FnArg::Receiver(receiver)
                if receiver.mutability.is_some() && receiver.reference.is_some() =>
            {
                errors.push_spanned(
                    receiver,
                    "#[cached] methods cannot take `&mut self`: a cache hit would skip the \
                     mutation. Take `&self`, or make it a function that returns the new state",
                )
            }
            FnArg::Receiver(receiver) if receiver.colon_token.is_some() => errors.push_spanned(
                receiver,
                "#[cached] methods take `&self` or `self`; a receiver of another type \
                 (`self: Box<Self>`, ...) is not supported",
            ),
            FnArg::Receiver(_) => {
                receiver_use = Some(ReceiverUse {
                    ignored: ignores("self"),
                });
            }
            FnArg::Typed(typed) => {
                TypeCheck {
                    errors: &mut errors,
                }
                .visit_type(&typed.ty);
                params.push(param(index, &typed.pat, &typed.ty));
            }
        }
    }
    if let Some((_, names)) = &args.ignore {
        let mut seen: Vec<&Ident> = Vec::new();
        for name in names {
            if seen.contains(&name) {
                errors.push(name.span(), format!("`{name}` is already ignored"));
                continue;
            }
            seen.push(name);
            if name == "self" {
                if receiver_use.is_none() {
                    errors.push(name.span(), "`self` can be ignored only in a method");
                }
                continue;
            }
            match params
                .iter_mut()
                .find(|p| p.pattern.is_none() && p.binding == *name)
            {
                Some(param) => param.ignored = true,
                None => {
                    let known: Vec<String> = params
                        .iter()
                        .filter(|p| p.pattern.is_none())
                        .map(|p| format!("`{}`", p.binding))
                        .collect();
                    errors.push(
                        name.span(),
                        format!(
                            "`{name}` is not an argument of this function; `ignore(...)` takes \
                             argument names: {}",
                            if known.is_empty() {
                                "none here".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
            }
        }
    }
    let associated = receiver_use.is_some()
        || args.associated.is_some()
        || mentions_self(quote::quote!(#sig))
        || body_mentions_self(quote::quote!(#item_block));
    match errors.0 {
        Some(error) => Err(error),
        None => Ok(Checked {
            params,
            receiver: receiver_use,
            associated,
        }),
    }
}

fn param(index: usize, pat: &Pat, ty: &Type) -> Param {
    match pat {
        Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => Param {
            binding: ident.ident.clone(),
            mutable: ident.mutability.is_some(),
            pattern: None,
            ty: ty.clone(),
            ignored: false,
        },
        _ => Param {
            binding: format_ident!("__memo_arg{}", index),
            mutable: false,
            pattern: Some(pat.clone()),
            ty: ty.clone(),
            ignored: false,
        },
    }
}

fn contains_impl_trait(ty: &Type) -> bool {
    struct Finder(bool);
    impl<'ast> Visit<'ast> for Finder {
        fn visit_type_impl_trait(&mut self, _: &'ast syn::TypeImplTrait) {
            self.0 = true;
        }
    }
    let mut finder = Finder(false);
    finder.visit_type(ty);
    finder.0
}
