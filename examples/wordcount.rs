//! MapReduce over a folder of text files: one cached map per file, then a reduce.
//!
//! ```sh
//! cargo run --example wordcount -- path/to/folder     # default: this repository's docs
//! ```
//!
//! Each file's word counts are cached by the file's content, so the rerun after adding or editing
//! one file computes only that file; every other file is loaded from the cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memo::prelude::*;

/// The map step: word frequencies of one text. Keyed by the text itself, so an edited file is a
/// new key and a renamed one is still a hit.
#[cached]
fn word_counts(text: &str) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

/// The text files directly in `folder`, in a stable order.
fn text_files(folder: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let folder = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"));
    let files = text_files(&folder)?;

    // Map: one cached computation per file (reading a file is cheap; counting is the work).
    let outcome = files
        .par_cached_map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            word_counts(&text)
        })
        .run()?;

    // Reduce: merge the per-file counts.
    let mut total: HashMap<String, u64> = HashMap::new();
    for counts in &outcome.results {
        for (word, n) in counts {
            *total.entry(word.clone()).or_insert(0) += n;
        }
    }
    let mut top: Vec<(&String, &u64)> = total.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));

    println!(
        "{} files in {}: {} loaded from cache, {} computed",
        files.len(),
        folder.display(),
        outcome.from_cache,
        outcome.computed
    );
    for (word, n) in top.into_iter().take(10) {
        println!("{n:>6}  {word}");
    }
    Ok(())
}
