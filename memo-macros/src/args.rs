//! The attribute's options, parsed into a typed model.

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::{Expr, Lit, Path, Token};

mod kw {
    syn::custom_keyword!(version);
    syn::custom_keyword!(memory);
}

/// What `#[cached(...)]` was given.
#[derive(Default)]
pub(crate) struct Args {
    /// `version = "2"`: folded into the function-version hash.
    pub version: Option<String>,
    /// `memory = EXPR`: the cache to use instead of the global one.
    pub memory: Option<Expr>,
    /// `crate = path`: where memo is, for crates that rename or re-export it.
    pub krate: Option<Path>,
}

const OPTIONS: &str = "`version = \"...\"`, `memory = EXPR` and `crate = path`";

/// Consumes the `=` after an option's name, or says at the name what the option needs.
fn equals(input: ParseStream<'_>, span: Span, form: &str) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        Ok(())
    } else {
        Err(syn::Error::new(
            span,
            format!("this option needs a value: `{form}`"),
        ))
    }
}

/// Stores an option's value, or reports the option as given twice.
fn set_once<T>(slot: &mut Option<T>, value: T, span: Span, name: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(
            span,
            format!("duplicate option `{name}`: give it once"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        let mut errors: Option<syn::Error> = None;
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            let outcome = if lookahead.peek(kw::version) {
                let key: kw::version = input.parse()?;
                equals(input, key.span, "version = \"2\"")?;
                let value = match input.parse::<Lit>()? {
                    Lit::Str(s) => s.value(),
                    Lit::Int(i) => i.base10_digits().to_owned(),
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "`version` takes a string or an integer, e.g. `version = \"2\"`",
                        ))
                    }
                };
                set_once(&mut args.version, value, key.span, "version")
            } else if lookahead.peek(kw::memory) {
                let key: kw::memory = input.parse()?;
                equals(input, key.span, "memory = EXPR")?;
                let value: Expr = input.parse()?;
                set_once(&mut args.memory, value, key.span, "memory")
            } else if lookahead.peek(Token![crate]) {
                let key: Token![crate] = input.parse()?;
                equals(input, key.span, "crate = path::to::memo")?;
                let value = Path::parse_mod_style(input)?;
                set_once(&mut args.krate, value, key.span, "crate")
            } else if input.peek(syn::Ident) {
                let unknown: syn::Ident = input.parse()?;
                return Err(syn::Error::new(
                    unknown.span(),
                    format!("unknown option `{unknown}`: #[cached] accepts {OPTIONS}"),
                ));
            } else {
                return Err(lookahead.error());
            };
            if let Err(error) = outcome {
                match &mut errors {
                    Some(all) => all.combine(error),
                    None => errors = Some(error),
                }
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        match errors {
            Some(errors) => Err(errors),
            None => Ok(args),
        }
    }
}
