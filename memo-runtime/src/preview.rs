//! Argument previews: a short `Debug` form of a call's arguments, stored beside its entry so that
//! people can see what an entry was computed from.
//!
//! Generated code writes `(&Preview(&arg)).memo_preview(&mut out)` with both traits in scope:
//! method resolution picks [`PreviewDebug`] when the argument's type implements `Debug`, and
//! [`PreviewNone`] (one step of auto-referencing later) otherwise, so no bound is required.

use std::fmt::{self, Write};

/// The longest preview kept, in bytes; formatting stops there, so a huge argument costs little.
pub const PREVIEW_LIMIT: usize = 200;

/// An argument to preview.
pub struct Preview<'a, T: ?Sized>(pub &'a T);

/// Previews an argument whose type implements `Debug`.
pub trait PreviewDebug {
    /// Appends the argument's `Debug` form, cut at [`PREVIEW_LIMIT`].
    fn memo_preview(&self, out: &mut String);
}

impl<T: fmt::Debug + ?Sized> PreviewDebug for Preview<'_, T> {
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

impl<T: ?Sized> PreviewNone for &Preview<'_, T> {
    fn memo_preview(&self, out: &mut String) {
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
        (&Preview(&vec![1, 2])).memo_preview(&mut out);
        out.push_str(", ");
        (&Preview(&Opaque)).memo_preview(&mut out);
        assert_eq!(out, "[1, 2], …");
    }

    #[test]
    #[allow(clippy::needless_borrow)]
    fn huge_arguments_are_cut() {
        let big: Vec<u64> = (0..1_000_000).collect();
        let mut out = String::new();
        (&Preview(&big)).memo_preview(&mut out);
        assert!(out.len() <= PREVIEW_LIMIT + '…'.len_utf8());
        assert!(out.starts_with("[0, 1, 2"));
        assert!(out.ends_with('…'));
    }

    #[test]
    fn lines_stay_one_line() {
        assert_eq!(line("k", "a\tb\nc"), "k\ta b c\n");
    }
}
