//! Validation of the function against what `#[cached]` supports, producing the model that
//! expansion reads. Every problem is collected, so one compile shows them all.

use proc_macro2::Span;
use quote::format_ident;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, GenericParam, Ident, ItemFn, Pat, ReturnType, Type};

use crate::args::Args;

/// A function `#[cached]` can expand.
pub(crate) struct CachedFn {
    pub item: ItemFn,
    pub args: Args,
    pub params: Vec<Param>,
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

/// Checks the function against what `#[cached]` supports; its parameters, or every problem.
pub(crate) fn validate(item: &ItemFn) -> Result<Vec<Param>, syn::Error> {
    let mut errors = Errors::default();
    let sig = &item.sig;
    if let Some(token) = &sig.constness {
        errors.push(
            token.span,
            "a `const fn` cannot be #[cached]: remove `const`",
        );
    }
    if let Some(token) = &sig.asyncness {
        errors.push(token.span, "#[cached] does not support `async fn` yet");
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(variadic.span(), "variadic functions cannot be #[cached]");
    }
    for param in &sig.generics.params {
        match param {
            GenericParam::Lifetime(_) => {}
            GenericParam::Type(ty) => errors.push(
                ty.ident.span(),
                "#[cached] does not support generic type parameters yet: write a non-generic \
                 #[cached] function per type",
            ),
            GenericParam::Const(c) => errors.push(
                c.ident.span(),
                "#[cached] does not support const generic parameters yet",
            ),
        }
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
    let mut params = Vec::new();
    for (index, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(receiver) => errors.push(
                receiver.self_token.span,
                "#[cached] does not support methods (`self` receivers) yet: make it a free \
                 function that takes the value as an argument",
            ),
            FnArg::Typed(typed) => {
                TypeCheck {
                    errors: &mut errors,
                }
                .visit_type(&typed.ty);
                params.push(param(index, &typed.pat, &typed.ty));
            }
        }
    }
    match errors.0 {
        Some(error) => Err(error),
        None => Ok(params),
    }
}

fn param(index: usize, pat: &Pat, ty: &Type) -> Param {
    match pat {
        Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => Param {
            binding: ident.ident.clone(),
            mutable: ident.mutability.is_some(),
            pattern: None,
            ty: ty.clone(),
        },
        _ => Param {
            binding: format_ident!("__memo_arg{}", index),
            mutable: false,
            pattern: Some(pat.clone()),
            ty: ty.clone(),
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
