//! The cache inspector: what a memo cache holds.
//!
//! ```sh
//! cargo run --example inspect -- ls                    # one row per function
//! cargo run --example inspect -- show my_function      # its versions and entries
//! cargo run --example inspect -- source my_function    # the source of its latest version
//! cargo run --example inspect -- diff my_function V1 V2  # what changed between two versions
//! cargo run --example inspect -- stats                 # totals
//! cargo run --example inspect -- gc --max-bytes 2GiB --max-age 30d --keep-versions 3 [--dry-run]
//! cargo run --example inspect -- evictions             # what was evicted, and why
//! cargo run --example inspect -- verify [--fix]        # check every entry
//! cargo run --example inspect -- clear [my_function]   # remove (asks first, unless --yes)
//! ```
//!
//! Every command takes `--dir DIR` (default: `MEMO_DIR`, else memo's default location; built with
//! the `remote` feature, a URL such as `s3://bucket/prefix` inspects a shared remote cache) and
//! `--json` for scripts. A function is named by its full name as `ls` shows it
//! (`crate.module.function`) or by any unambiguous end of it (`function`, `module.function`).
//! A thin shell over `memo::Memory`'s inventory API: it has no logic of its own.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use comfy_table::{presets, Table};
use memo::gc::Limits;
use memo::{FunctionInfo, Memory, VersionInfo};

#[derive(Parser)]
#[command(name = "inspect", about = "Shows what a memo cache holds")]
struct Cli {
    /// The cache folder, or a remote cache's URL (default: MEMO_DIR, else memo's default location).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One row per function: versions, entries, size, last use, stored compute time.
    Ls,
    /// A function's versions and the entries of its latest (most recently used) version.
    Show {
        /// The function.
        function: String,
    },
    /// The source text a version was compiled from (default: the latest).
    Source {
        /// The function.
        function: String,
        /// A version folder name, as `show` lists them.
        #[arg(long)]
        version: Option<String>,
    },
    /// What changed in the source between two versions (folder names, as `show` lists them).
    Diff {
        /// The function.
        function: String,
        /// The older version.
        from: String,
        /// The newer version.
        to: String,
    },
    /// Totals for the cache folder.
    Stats,
    /// Evicts least recently used entries and prunes old versions, within limits.
    Gc {
        /// At most this much: `500MiB`, `2GiB`, ...
        #[arg(long)]
        max_bytes: Option<bytesize::ByteSize>,
        /// No entry unused for longer: `30d`, `12h`, ...
        #[arg(long)]
        max_age: Option<humantime::Duration>,
        /// At most this many entries.
        #[arg(long)]
        max_items: Option<usize>,
        /// At most this many versions per function (the most recently used).
        #[arg(long)]
        keep_versions: Option<usize>,
        /// No version unused for longer: `90d`, ... (with --keep-versions: past both).
        #[arg(long)]
        max_version_age: Option<humantime::Duration>,
        /// List what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What was evicted, when and why.
    Evictions,
    /// Checks every entry's header, key and checksum.
    Verify {
        /// Remove the broken entries.
        #[arg(long)]
        fix: bool,
    },
    /// Removes a function's entries (all versions), or everything.
    Clear {
        /// The function; everything when omitted.
        function: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("inspect: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let memory = open(cli.dir.clone())?;
    match &cli.command {
        Command::Ls => ls(&memory, cli.json),
        Command::Show { function } => show(&memory, function, cli.json),
        Command::Source { function, version } => {
            source(&memory, function, version.as_deref(), cli.json)
        }
        Command::Diff { function, from, to } => diff(&memory, function, from, to, cli.json),
        Command::Stats => stats(&memory, cli.json),
        Command::Gc {
            max_bytes,
            max_age,
            max_items,
            keep_versions,
            max_version_age,
            dry_run,
        } => {
            let mut limits = Limits::new().dry_run(*dry_run);
            limits.max_bytes = max_bytes.map(|b| b.as_u64());
            limits.max_age = max_age.map(Into::into);
            limits.max_items = *max_items;
            limits.keep_versions = *keep_versions;
            limits.max_version_age = max_version_age.map(Into::into);
            gc(&memory, &limits, cli.json)
        }
        Command::Evictions => evictions(&memory, cli.json),
        Command::Verify { fix } => verify(&memory, *fix, cli.json),
        Command::Clear { function, yes } => clear(&memory, function.as_deref(), *yes, cli.json),
    }
}

/// The cache in `dir`, or the one the environment names; an error when it is not a memo cache.
fn open(dir: Option<PathBuf>) -> Result<Memory, Failure> {
    let memory = match dir {
        Some(dir) => Memory::at(&dir.to_string_lossy())?,
        None => {
            let memory = Memory::from_env();
            match std::env::var(memo::MEMO_DIR) {
                // A remote MEMO_DIR that cannot be opened is an error here, not the default folder.
                Ok(url) if url.contains("://") && memory.is_enabled() => Memory::at(&url)?,
                _ => memory,
            }
        }
    };
    if memory.remote_url().is_some() {
        return Ok(memory);
    }
    let Some(location) = memory.location() else {
        return Err(
            "caching is disabled (MEMO_DISABLE is set): there is no cache to inspect".into(),
        );
    };
    if !location.join(memo::format::store::LAYOUT_DIR).is_dir() {
        return Err(format!(
            "{} is not a memo cache (it has no {}/ folder)",
            location.display(),
            memo::format::store::LAYOUT_DIR
        )
        .into());
    }
    Ok(memory)
}

/// The function named `name`: its full name, or the one function whose name ends with `.name`.
fn find(memory: &Memory, name: &str) -> Result<FunctionInfo, Failure> {
    let functions = memory.functions()?;
    if let Some(exact) = functions.iter().find(|f| f.name == name) {
        return Ok(exact.clone());
    }
    let suffix = format!(".{name}");
    let matching: Vec<&FunctionInfo> = functions
        .iter()
        .filter(|f| f.name.ends_with(&suffix))
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!("no function named `{name}` in this cache (see `ls`)").into()),
        many => {
            let names: Vec<&str> = many.iter().map(|f| f.name.as_str()).collect();
            Err(format!("`{name}` is ambiguous: {}", names.join(", ")).into())
        }
    }
}

fn ls(memory: &Memory, json: bool) -> Result<(), Failure> {
    let functions = memory.functions()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&functions)?);
        return Ok(());
    }
    let mut table = table(&[
        "function",
        "versions",
        "entries",
        "size",
        "last used",
        "compute stored",
    ]);
    for f in &functions {
        table.add_row(vec![
            f.name.clone(),
            f.versions.len().to_string(),
            f.entries().to_string(),
            size(f.bytes()),
            ago(f.last_used()),
            duration(f.compute_time()),
        ]);
    }
    println!("{table}");
    Ok(())
}

fn show(memory: &Memory, name: &str, json: bool) -> Result<(), Failure> {
    let function = find(memory, name)?;
    let latest = function
        .versions
        .first()
        .ok_or("the function has no version")?;
    let entries = memory.entries(&function.name, &latest.version)?;
    if json {
        let shown = serde_json::json!({ "function": function, "latest_entries": entries });
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    println!("{}", function.name);
    let mut versions = table(&[
        "version",
        "",
        "entries",
        "size",
        "last used",
        "compute stored",
    ]);
    for (i, v) in function.versions.iter().enumerate() {
        versions.add_row(vec![
            v.version.clone(),
            if i == 0 {
                "latest".into()
            } else {
                String::new()
            },
            v.entries.to_string(),
            size(v.bytes),
            ago(v.last_used),
            duration(v.compute_time),
        ]);
    }
    println!("{versions}");
    println!("entries of {}:", latest.version);
    let mut rows = table(&[
        "key",
        "arguments",
        "created",
        "last used",
        "compute",
        "size",
    ]);
    for e in &entries {
        rows.add_row(vec![
            e.key[..16].to_owned(),
            e.preview.clone().unwrap_or_default(),
            ago(Some(e.created)),
            ago(Some(e.last_used)),
            duration(e.duration),
            size(e.size),
        ]);
    }
    println!("{rows}");
    Ok(())
}

/// A version of `function` named by its folder or full hash, or the latest when `None`.
fn choose<'a>(
    function: &'a FunctionInfo,
    version: Option<&str>,
) -> Result<&'a VersionInfo, Failure> {
    match version {
        Some(v) => Ok(function
            .versions
            .iter()
            .find(|info| info.version == v || info.full_version.as_deref() == Some(v))
            .ok_or_else(|| format!("`{}` has no version {v} (see `show`)", function.name))?),
        None => Ok(function
            .versions
            .first()
            .ok_or("the function has no version")?),
    }
}

fn source(memory: &Memory, name: &str, version: Option<&str>, json: bool) -> Result<(), Failure> {
    let function = find(memory, name)?;
    let chosen = choose(&function, version)?;
    let text = memory.source(&function.name, &chosen.version)?;
    if json {
        let shown = serde_json::json!({
            "function": function.name,
            "version": chosen.version,
            "full_version": chosen.full_version,
            "source": text,
        });
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    print!("{text}");
    Ok(())
}

fn diff(memory: &Memory, name: &str, from: &str, to: &str, json: bool) -> Result<(), Failure> {
    let function = find(memory, name)?;
    let old = memory.source(&function.name, &choose(&function, Some(from))?.version)?;
    let new = memory.source(&function.name, &choose(&function, Some(to))?.version)?;
    let diff = similar::TextDiff::from_lines(&old, &new)
        .unified_diff()
        .header(from, to)
        .to_string();
    if json {
        let shown =
            serde_json::json!({ "function": function.name, "from": from, "to": to, "diff": diff });
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print!("{diff}");
    }
    Ok(())
}

fn stats(memory: &Memory, json: bool) -> Result<(), Failure> {
    let functions = memory.functions()?;
    let versions: usize = functions.iter().map(|f| f.versions.len()).sum();
    let entries: usize = functions.iter().map(FunctionInfo::entries).sum();
    let bytes: u64 = functions.iter().map(FunctionInfo::bytes).sum();
    let compute: Duration = functions.iter().map(FunctionInfo::compute_time).sum();
    // A remote cache by its URL, else the folder.
    let location = match memory.remote_url() {
        Some(url) => url.to_owned(),
        None => memory
            .location()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    if json {
        let totals = serde_json::json!({
            "cache": location,
            "functions": functions.len(),
            "versions": versions,
            "entries": entries,
            "bytes": bytes,
            "compute_seconds": compute.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&totals)?);
        return Ok(());
    }
    println!("cache:          {location}");
    println!("functions:      {}", functions.len());
    println!("versions:       {versions}");
    println!("entries:        {entries}");
    println!("size:           {}", size(bytes));
    println!("compute stored: {}", duration(compute));
    Ok(())
}

fn gc(memory: &Memory, limits: &Limits, json: bool) -> Result<(), Failure> {
    let limited = limits.max_bytes.is_some()
        || limits.max_age.is_some()
        || limits.max_items.is_some()
        || limits.keep_versions.is_some()
        || limits.max_version_age.is_some();
    if !limited {
        return Err(
            "gc needs a limit: --max-bytes, --max-age, --max-items, --keep-versions or --max-version-age".into(),
        );
    }
    let report = memory.reduce_size(limits)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut rows = table(&["function", "version", "key", "size", "last used", "reason"]);
    for e in &report.evicted {
        rows.add_row(vec![
            e.function.clone(),
            e.version.clone(),
            e.key[..16].to_owned(),
            size(e.size),
            ago(Some(e.last_used)),
            format!("{:?}", e.reason),
        ]);
    }
    if !report.evicted.is_empty() {
        println!("{rows}");
    }
    let gone: u64 = report.evicted.iter().map(|e| e.size).sum();
    println!(
        "{} {} entries ({}); kept {} ({})",
        if report.dry_run {
            "would evict"
        } else {
            "evicted"
        },
        report.evicted.len(),
        size(gone),
        report.kept_entries,
        size(report.kept_bytes)
    );
    Ok(())
}

fn evictions(memory: &Memory, json: bool) -> Result<(), Failure> {
    let log = memory.evictions()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&log)?);
        return Ok(());
    }
    let mut rows = table(&["when", "reason", "function", "version", "key", "size"]);
    for e in &log {
        // (A damaged line's time past what a clock holds shows as the epoch.)
        let when = std::time::UNIX_EPOCH
            .checked_add(Duration::from_secs(e.at))
            .unwrap_or(std::time::UNIX_EPOCH);
        rows.add_row(vec![
            ago(Some(when)),
            e.reason.clone(),
            e.function.clone(),
            e.version.clone(),
            e.key.get(..16).unwrap_or(&e.key).to_owned(),
            size(e.size),
        ]);
    }
    println!("{rows}");
    Ok(())
}

fn verify(memory: &Memory, fix: bool, json: bool) -> Result<(), Failure> {
    let report = memory.verify()?;
    let removed = if fix {
        memory.remove_broken(&report)?
    } else {
        0
    };
    if json {
        let broken: Vec<serde_json::Value> = report
            .broken
            .iter()
            .map(|(path, reason)| serde_json::json!({ "path": path, "reason": reason }))
            .collect();
        let shown = serde_json::json!({
            "valid": report.valid,
            "broken": broken,
            "removed": removed,
            "temporary_files": report.temporary_files,
            "lock_files": report.lock_files,
        });
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    println!(
        "{} valid entries, {} broken",
        report.valid,
        report.broken.len()
    );
    for (path, reason) in &report.broken {
        println!("  broken: {} ({reason})", path.display());
    }
    if fix {
        println!("removed {removed} broken entries");
    }
    println!(
        "{} temporary files, {} lock files (left by writes in progress or processes that died)",
        report.temporary_files, report.lock_files
    );
    Ok(())
}

fn clear(memory: &Memory, name: Option<&str>, yes: bool, json: bool) -> Result<(), Failure> {
    let target = match name {
        Some(name) => Some(find(memory, name)?),
        None => None,
    };
    let what = match &target {
        Some(f) => format!(
            "{} entries of `{}` ({})",
            f.entries(),
            f.name,
            size(f.bytes())
        ),
        None => "everything in this cache".to_owned(),
    };
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(format!("refusing to remove {what} without --yes").into());
        }
        print!("Remove {what}? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing removed");
            return Ok(());
        }
    }
    match &target {
        Some(f) => memory.clear_function(&f.name)?,
        None => memory.clear()?,
    }
    if json {
        let function = target.as_ref().map(|f| f.name.as_str());
        println!(
            "{}",
            serde_json::json!({ "removed": what, "function": function })
        );
    } else {
        println!("removed {what}");
    }
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_BORDERS_ONLY);
    table.set_header(header.to_vec());
    table
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    match secs {
        s if s < 1e-3 => format!("{:.0} µs", s * 1e6),
        s if s < 1.0 => format!("{:.0} ms", s * 1e3),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

fn ago(time: Option<SystemTime>) -> String {
    let Some(time) = time else {
        return "never".to_owned();
    };
    let secs = SystemTime::now()
        .duration_since(time)
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..=59 => "just now".to_owned(),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}
