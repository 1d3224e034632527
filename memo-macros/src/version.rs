//! The function-version hash and the stored source text.
//!
//! The hash covers the function's tokens (signature and body) and nothing else: whitespace and
//! comments are not tokens, doc comments (`#[doc]` attributes) are skipped, and spans (so line
//! numbers) are ignored. Moving a function, reformatting it or editing its comments keeps its
//! version; any change to a token makes a new one.

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use quote::ToTokens;
use syn::ItemFn;

/// 64 hex digits of BLAKE3 over the normalized tokens, the explicit `version` option and the
/// options that change what is keyed or stored (`options`, e.g. `ignore(verbose)`).
pub(crate) fn version_hash(item: &ItemFn, explicit: Option<&str>, options: &str) -> String {
    let mut text = String::new();
    normalize(item.sig.to_token_stream(), &mut text);
    text.push('\n');
    normalize(item.block.to_token_stream(), &mut text);
    if let Some(version) = explicit {
        text.push_str("\nversion = ");
        text.push_str(version);
    }
    if !options.is_empty() {
        text.push_str("\noptions: ");
        text.push_str(options);
    }
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// The function as a person should see it in the cache: formatted, doc comments left out (they
/// do not make a version either).
pub(crate) fn source_text(item: &ItemFn) -> String {
    let mut item = item.clone();
    item.attrs.retain(|attr| !attr.path().is_ident("doc"));
    prettyplease::unparse(&syn::File {
        shebang: None,
        attrs: Vec::new(),
        items: vec![syn::Item::Fn(item)],
    })
}

fn is_doc_attribute(group: &TokenTree) -> bool {
    match group {
        TokenTree::Group(g) if g.delimiter() == Delimiter::Bracket => matches!(
            g.stream().into_iter().next(),
            Some(TokenTree::Ident(ident)) if ident == "doc"
        ),
        _ => false,
    }
}

fn is_punct(token: Option<&TokenTree>, ch: char) -> bool {
    matches!(token, Some(TokenTree::Punct(p)) if p.as_char() == ch)
}

/// Writes tokens in a canonical text form: one space after each token, none inside joint
/// punctuation (`::`, `->`), delimiters as themselves. The tokens come from syn's syntax tree, so
/// spacing inside expressions is already canonical; inside a macro call the tokens are the
/// user's, and whether punctuation is joint is kept there: a macro can tell `<<` from `< <`.
fn normalize(tokens: TokenStream, out: &mut String) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        if is_punct(tokens.get(i), '#') {
            let inner = is_punct(tokens.get(i + 1), '!');
            let at = if inner { i + 2 } else { i + 1 };
            if tokens.get(at).is_some_and(is_doc_attribute) {
                i = at + 1;
                continue;
            }
        }
        match &tokens[i] {
            TokenTree::Group(group) => {
                let (open, close) = match group.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::None => ("", ""),
                };
                out.push_str(open);
                out.push(' ');
                normalize(group.stream(), out);
                out.push_str(close);
                out.push(' ');
            }
            TokenTree::Ident(ident) => {
                out.push_str(&ident.to_string());
                out.push(' ');
            }
            TokenTree::Literal(literal) => {
                out.push_str(&literal.to_string());
                out.push(' ');
            }
            TokenTree::Punct(punct) => {
                out.push(punct.as_char());
                if punct.spacing() == proc_macro2::Spacing::Alone {
                    out.push(' ');
                }
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(source: &str) -> String {
        version_hash(&syn::parse_str(source).unwrap(), None, "")
    }

    #[test]
    fn formatting_comments_and_docs_do_not_change_the_version() {
        let base = hash("fn f(x: u64) -> u64 { x * x }");
        assert_eq!(
            base,
            hash("fn f(x:u64)->u64{\n    // square it\n    x*x\n}")
        );
        assert_eq!(
            base,
            hash("/// Squares.\nfn f(x: u64) -> u64 { /* yes */ x * x }")
        );
        assert_eq!(
            hash("fn f(x: u64) -> u64 { fn g() {} x * x }"),
            hash("fn f(x: u64) -> u64 {\n    /// A helper.\n    fn g() {}\n    x * x\n}")
        );
    }

    #[test]
    fn token_changes_and_explicit_versions_do() {
        let base = hash("fn f(x: u64) -> u64 { x * x }");
        assert_ne!(base, hash("fn f(x: u64) -> u64 { x * x + 1 }"));
        assert_ne!(base, hash("fn f(x: u32) -> u64 { x * x }"));
        assert_ne!(base, hash("fn f(x: u64) -> u64 { x - -x }"));
        // Expressions are re-emitted from syn's syntax tree, so spacing in them is not a change...
        assert_eq!(hash("fn f() { a - -b; }"), hash("fn f() { a --b; }"));
        // ...but a macro's input is kept verbatim, and a macro can tell `<<` from `< <`.
        assert_ne!(hash("fn f() { m!(<<); }"), hash("fn f() { m!(< <); }"));
        let item: ItemFn = syn::parse_str("fn f(x: u64) -> u64 { x * x }").unwrap();
        assert_ne!(base, version_hash(&item, Some("2"), ""));
        assert_ne!(base, version_hash(&item, None, "ignore(x) "));
        assert_eq!(
            version_hash(&item, Some("2"), ""),
            version_hash(&item, Some("2"), "")
        );
    }

    #[test]
    fn other_attributes_than_docs_count() {
        assert_ne!(
            hash("fn f() { #[cfg(a)] g(); }"),
            hash("fn f() { #[cfg(b)] g(); }")
        );
    }

    #[test]
    fn source_text_is_formatted_without_docs() {
        let item: ItemFn = syn::parse_str("/// Doc.\n#[inline] fn f(x:u64)->u64{x*x}").unwrap();
        assert_eq!(
            source_text(&item),
            "#[inline]\nfn f(x: u64) -> u64 {\n    x * x\n}\n"
        );
    }
}
