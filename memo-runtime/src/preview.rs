//! Argument previews: a short `Debug` form of a call's arguments, stored beside its entry so that
//! people can see what an entry was computed from.
//!
//! Generated code writes `(&&&Preview(&arg)).memo_preview(&mut out)` with the three traits in
//! scope: method resolution tries them one dereference apart, so it picks [`PreviewSeq`] for a
//! slice, `Vec`, array, boxed slice or [`Array`](crate::Array) of `Debug` items (and a reference
//! to one), else [`PreviewDebug`] when the argument's type implements `Debug`, else
//! [`PreviewNone`]; no bound is required.
//!
//! Sequences have their own path because `Debug` for a slice goes on through every item after
//! its writer failed (each item is skipped, but visited): a preview of a 100 MB array would take
//! longer than hashing it. [`PreviewSeq`] writes the same text, item by item, and stops at the
//! limit. (The items themselves are written with `Debug`: a sequence of large sequences is still
//! visited whole.)

use std::fmt::{self, Write};

/// The longest preview kept, in bytes; formatting stops there (for a sequence, see the module
/// notes; other types' `Debug` may go on without writing).
pub const PREVIEW_LIMIT: usize = 200;

/// An argument to preview.
pub struct Preview<'a, T: ?Sized>(pub &'a T);

/// Previews an argument whose type implements `Debug`.
pub trait PreviewDebug {
    /// Appends the argument's `Debug` form, cut at [`PREVIEW_LIMIT`].
    fn memo_preview(&self, out: &mut String);
}

impl<T: fmt::Debug + ?Sized> PreviewDebug for &Preview<'_, T> {
    fn memo_preview(&self, out: &mut String) {
        let mut bounded = Bounded {
            out,
            room: PREVIEW_LIMIT,
        };
        if write!(bounded, "{:?}", self.0).is_err() {
            out.push('…');
        }
    }
}

/// Previews an argument whose type does not implement `Debug`.
pub trait PreviewNone {
    /// Appends `…`.
    fn memo_preview(&self, out: &mut String);
}

impl<T: ?Sized> PreviewNone for Preview<'_, T> {
    fn memo_preview(&self, out: &mut String) {
        out.push('…');
    }
}

/// Previews a sequence of `Debug` items (a slice, `Vec`, array, boxed slice or
/// [`Array`](crate::Array), or a reference to one) as `Debug` would, item by item, stopping at
/// [`PREVIEW_LIMIT`].
pub trait PreviewSeq {
    /// Appends the sequence's `Debug` form, cut at [`PREVIEW_LIMIT`].
    fn memo_preview(&self, out: &mut String);
}

/// Implements [`PreviewSeq`] for sequence types (each with its generic parameters), whose items
/// are all taken as a slice with `[..]`.
macro_rules! preview_seq {
    ($([$($generics:tt)*] $seq:ty;)*) => {$(
        impl<$($generics)*> PreviewSeq for &&Preview<'_, $seq> {
            fn memo_preview(&self, out: &mut String) {
                let items: &[_] = &self.0[..];
                sequence(items, out);
            }
        }
    )*};
}

preview_seq! {
    [E: fmt::Debug] &[E];
    [E: fmt::Debug] Vec<E>;
    [E: fmt::Debug] &Vec<E>;
    [E: fmt::Debug, const N: usize] [E; N];
    [E: fmt::Debug, const N: usize] &[E; N];
    [E: fmt::Debug] Box<[E]>;
    [E: crate::key::Number + fmt::Debug] crate::Array<E>;
    [E: crate::key::Number + fmt::Debug] &crate::Array<E>;
}

/// Writes `[a, b, …]` as `Debug` does, stopping at the first item that does not fit.
fn sequence<E: fmt::Debug>(items: &[E], out: &mut String) {
    #[cfg(test)]
    tests::SEQUENCES.with(|count| count.set(count.get() + 1));
    let mut bounded = Bounded {
        out,
        room: PREVIEW_LIMIT,
    };
    let mut written = bounded.write_char('[');
    for (i, item) in items.iter().enumerate() {
        if written.is_err() {
            break;
        }
        if i > 0 {
            written = bounded.write_str(", ");
        }
        written = written.and_then(|()| write!(bounded, "{item:?}"));
    }
    if written.and_then(|()| bounded.write_char(']')).is_err() {
        out.push('…');
    }
}

/// A writer that fails once `room` bytes are written, which stops `Debug` formatting early.
struct Bounded<'a> {
    out: &'a mut String,
    room: usize,
}

impl Write for Bounded<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if text.len() <= self.room {
            self.out.push_str(text);
            self.room -= text.len();
            return Ok(());
        }
        let mut cut = self.room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.out.push_str(&text[..cut]);
        self.room = 0;
        Err(fmt::Error)
    }
}

/// One line of a previews file: tabs and line breaks become spaces.
pub(crate) fn line(key: &str, preview: &str) -> String {
    let clean: String = preview
        .chars()
        .map(|c| {
            if c == '\t' || c == '\n' || c == '\r' {
                ' '
            } else {
                c
            }
        })
        .collect();
    format!("{key}\t{clean}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Opaque;

    #[test]
    // The `&` is what lets method resolution choose between the two traits.
    #[allow(clippy::needless_borrow)]
    fn debug_types_are_previewed_and_others_are_not() {
        let mut out = String::new();
        (&&&Preview(&vec![1, 2])).memo_preview(&mut out);
        out.push_str(", ");
        (&&&Preview(&Opaque)).memo_preview(&mut out);
        out.push_str(", ");
        (&&&Preview(&(1, "a"))).memo_preview(&mut out);
        assert_eq!(out, "[1, 2], …, (1, \"a\")");
    }

    #[test]
    #[allow(clippy::needless_borrow)]
    fn huge_arguments_are_cut() {
        let big: Vec<u64> = (0..1_000_000).collect();
        let mut out = String::new();
        (&&&Preview(&big)).memo_preview(&mut out);
        assert!(out.len() <= PREVIEW_LIMIT + '…'.len_utf8());
        assert!(out.starts_with("[0, 1, 2"));
        assert!(out.ends_with('…'));
    }

    thread_local! {
        /// Sequences previewed item by item on this thread.
        pub(super) static SEQUENCES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The preview of `value` as generated code writes it, and whether it went item by item.
    macro_rules! previewed {
        ($value:expr) => {{
            let before = SEQUENCES.with(|count| count.get());
            let mut out = String::new();
            (&&&Preview(&$value)).memo_preview(&mut out);
            (out, SEQUENCES.with(|count| count.get()) > before)
        }};
    }

    #[test]
    #[allow(clippy::needless_borrow)]
    fn sequences_are_previewed_item_by_item_with_the_text_debug_writes() {
        let items = vec![1.5f64, -0.0, 3.0];
        let expected = format!("{items:?}");
        let slice: &[f64] = &items;
        let array = [1.5f64, -0.0, 3.0];
        let boxed: Box<[f64]> = items.clone().into_boxed_slice();
        let numbers = crate::Array::from(items.clone());
        for (preview, by_items) in [
            previewed!(items),
            previewed!(&items),
            previewed!(slice),
            previewed!(array),
            previewed!(&array),
            previewed!(boxed),
            previewed!(numbers),
            previewed!(&numbers),
        ] {
            assert_eq!(preview, expected);
            assert!(by_items);
        }
        // Empty, and cut in the middle of an item (as `Debug`'s text would be).
        assert_eq!(previewed!(Vec::<u8>::new()), ("[]".to_owned(), true));
        let words = vec!["x".repeat(150), "y".repeat(150)];
        let (cut, by_items) = previewed!(words);
        assert!(by_items);
        let full = format!("{words:?}");
        assert_eq!(cut, format!("{}…", &full[..PREVIEW_LIMIT]));
        // Other types take `Debug` as before.
        assert_eq!(previewed!((1, "a")), ("(1, \"a\")".to_owned(), false));
        assert_eq!(previewed!(Opaque), ("…".to_owned(), false));
    }

    #[test]
    fn lines_stay_one_line() {
        assert_eq!(line("k", "a\tb\nc"), "k\ta b c\n");
    }
}
