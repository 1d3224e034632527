//! The attribute's options, parsed into a typed model.

use proc_macro2::Span;
use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, Path, Token};

mod kw {
    syn::custom_keyword!(version);
    syn::custom_keyword!(memory);
    syn::custom_keyword!(ignore);
    syn::custom_keyword!(key);
    syn::custom_keyword!(store_errors);
    syn::custom_keyword!(skip_none);
    syn::custom_keyword!(associated);
    syn::custom_keyword!(deps);
    syn::custom_keyword!(expire);
    syn::custom_keyword!(validate);
    syn::custom_keyword!(compress);
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
    /// `ignore(a, b)`: parameters left out of the key; the span of `ignore`.
    pub ignore: Option<(Span, Vec<Ident>)>,
    /// `key = EXPR`: the key is this expression instead of the arguments.
    pub key: Option<Expr>,
    /// `store_errors`: a `Result`'s `Err` is stored too.
    pub store_errors: Option<Span>,
    /// `skip_none`: an `Option`'s `None` is not stored.
    pub skip_none: Option<Span>,
    /// `associated`: the function is in an `impl` block though it mentions neither `self` nor
    /// `Self`.
    pub associated: Option<Span>,
    /// `deps(a, m::b)`: tracked functions whose versions are folded into this one's.
    pub deps: Option<(Span, Vec<Path>)>,
    /// `expire = "7d"`: stored values older than this are recomputed.
    pub expire: Option<std::time::Duration>,
    /// `validate = path`: a `fn(&EntryMeta) -> bool` deciding whether a stored value is served.
    pub validate: Option<Path>,
    /// `compress = 3` (a zstd level) or `compress = false`; `Some(None)` is off.
    pub compress: Option<(Span, Option<i32>)>,
}

impl Args {
    /// The options that change what is stored or how it is keyed, as text for the version hash.
    pub fn keying(&self) -> String {
        let mut text = String::new();
        if let Some((_, names)) = &self.ignore {
            let names: Vec<String> = names.iter().map(ToString::to_string).collect();
            text.push_str(&format!("ignore({}) ", names.join(",")));
        }
        if let Some(key) = &self.key {
            text.push_str(&format!("key = {} ", key.to_token_stream()));
        }
        if self.store_errors.is_some() {
            text.push_str("store_errors ");
        }
        if self.skip_none.is_some() {
            text.push_str("skip_none ");
        }
        text
    }
}

const OPTIONS: &str = "`version = \"...\"`, `memory = EXPR`, `crate = path`, `ignore(arg, ...)`, \
                       `key = EXPR`, `deps(function, ...)`, `expire = \"7d\"`, \
                       `validate = function`, `compress = 3`, `store_errors`, `skip_none` and \
                       `associated`";

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
            } else if lookahead.peek(kw::ignore) {
                let name: kw::ignore = input.parse()?;
                let content;
                syn::parenthesized!(content in input);
                // `Ident::parse_any` also takes `self`, for `ignore(self)` in methods.
                let names = Punctuated::<Ident, Token![,]>::parse_terminated_with(
                    &content,
                    syn::ext::IdentExt::parse_any,
                )?;
                let names: Vec<Ident> = names.into_iter().collect();
                if names.is_empty() {
                    return Err(syn::Error::new(
                        name.span,
                        "`ignore(...)` needs the names of the arguments to leave out of the key",
                    ));
                }
                set_once(&mut args.ignore, (name.span, names), name.span, "ignore")
            } else if lookahead.peek(kw::key) {
                let name: kw::key = input.parse()?;
                equals(input, name.span, "key = EXPR")?;
                let value: Expr = input.parse()?;
                set_once(&mut args.key, value, name.span, "key")
            } else if lookahead.peek(kw::store_errors) {
                let name: kw::store_errors = input.parse()?;
                set_once(&mut args.store_errors, name.span, name.span, "store_errors")
            } else if lookahead.peek(kw::expire) {
                let name: kw::expire = input.parse()?;
                equals(input, name.span, "expire = \"7d\"")?;
                let text: syn::LitStr = input.parse()?;
                let duration = humantime::parse_duration(&text.value()).map_err(|error| {
                    syn::Error::new(
                        text.span(),
                        format!(
                            "`expire` takes a duration such as \"7d\", \"12h\" or \"30min\" ({error})"
                        ),
                    )
                })?;
                set_once(&mut args.expire, duration, name.span, "expire")
            } else if lookahead.peek(kw::compress) {
                let name: kw::compress = input.parse()?;
                equals(input, name.span, "compress = 3")?;
                let level =
                    match input.parse::<Lit>()? {
                        Lit::Bool(flag) if !flag.value => None,
                        Lit::Bool(_) => Some(3),
                        Lit::Int(level) => {
                            match level.base10_parse::<i32>()? {
                                valid @ 1..=19 => Some(valid),
                                _ => return Err(syn::Error::new_spanned(
                                    level,
                                    "`compress` takes a zstd level (1 to 19; 3 is the default) \
                                 or `false`",
                                )),
                            }
                        }
                        other => return Err(syn::Error::new_spanned(
                            other,
                            "`compress` takes a zstd level (1 to 19; 3 is the default) or `false`",
                        )),
                    };
                set_once(
                    &mut args.compress,
                    (name.span, level),
                    name.span,
                    "compress",
                )
            } else if lookahead.peek(kw::validate) {
                let name: kw::validate = input.parse()?;
                equals(input, name.span, "validate = path::to::function")?;
                let path = Path::parse_mod_style(input)?;
                set_once(&mut args.validate, path, name.span, "validate")
            } else if lookahead.peek(kw::deps) {
                let name: kw::deps = input.parse()?;
                let content;
                syn::parenthesized!(content in input);
                let paths = Punctuated::<Path, Token![,]>::parse_terminated_with(
                    &content,
                    Path::parse_mod_style,
                )?;
                let paths: Vec<Path> = paths.into_iter().collect();
                set_once(&mut args.deps, (name.span, paths), name.span, "deps")
            } else if lookahead.peek(kw::associated) {
                let name: kw::associated = input.parse()?;
                set_once(&mut args.associated, name.span, name.span, "associated")
            } else if lookahead.peek(kw::skip_none) {
                let name: kw::skip_none = input.parse()?;
                set_once(&mut args.skip_none, name.span, name.span, "skip_none")
            } else if input.peek(syn::Ident) {
                let unknown: syn::Ident = input.parse()?;
                let hint = match unknown.to_string().as_str() {
                    "ttl" | "time_to_live" | "expires_after" | "lifespan" => {
                        " (for an expiry, write `expire = \"1h\"`)"
                    }
                    "ignore_args" | "skip" => {
                        " (to leave arguments out of the key, write `ignore(name)`)"
                    }
                    "location" | "dir" | "path" => {
                        " (to choose the cache folder, write `memory = EXPR`)"
                    }
                    _ => "",
                };
                return Err(syn::Error::new(
                    unknown.span(),
                    format!("unknown option `{unknown}`{hint}: #[cached] accepts {OPTIONS}"),
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
