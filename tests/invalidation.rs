//! Invalidation as a user meets it: a crate is built several times with different sources of
//! one `#[cached]` function, sharing one cache folder.
//!
//! - whitespace, comments, doc comments and moving the function keep its version: served;
//! - a changed body is a new version: computed, with the new value;
//! - switching back serves the first version's entries again;
//! - `version = "..."` forces a new version.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fresh_dir;

/// The fixture's `main`: counts computations in the file named by `MEMO_TEST_COUNTER`.
const MAIN: &str = r#"
use memo::prelude::*;

fn count() {
    use std::io::Write;
    let path = std::env::var_os("MEMO_TEST_COUNTER").expect("counter file");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    file.write_all(b"computed\n").unwrap();
}

@FUNCTION@

fn main() {
    println!("value={}", compute(7));
}
"#;

const V1: &str = "#[cached]
fn compute(x: u64) -> u64 {
    count();
    x * x
}";

/// V1 reformatted, commented, documented and moved further down the file.
const V1_COSMETIC: &str = "



// Helpers first, then the cached function.
/// Squares its input.
///
/// A doc comment is not part of the version.
#[cached]
fn compute( x : u64 )->u64
{
    // Count every computation.
    count(); /* then square */
    x*x
}";

const V2: &str = "#[cached]
fn compute(x: u64) -> u64 {
    count();
    x * x + 1
}";

const V1_FORCED: &str = "#[cached(version = \"2\")]
fn compute(x: u64) -> u64 {
    count();
    x * x
}";

struct Fixture {
    /// The package name: one per test, so that tests building at once never share a binary.
    name: &'static str,
    dir: PathBuf,
    cache: PathBuf,
    counter: PathBuf,
    target: PathBuf,
}

impl Fixture {
    fn new(name: &'static str) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let work = fresh_dir(name);
        let dir = work.join("crate");
        std::fs::create_dir_all(dir.join("src")).unwrap();
        let manifest =
            std::fs::read_to_string(root.join("tests/fixtures/invalidation/Cargo.toml.in"))
                .unwrap()
                .replace("@NAME@", name)
                .replace(
                    "@MEMO_PATH@",
                    &root.display().to_string().replace('\\', "/"),
                );
        std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
        // The workspace's lock file: the same dependency versions, nothing to resolve.
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        Fixture {
            name,
            dir,
            cache: work.join("cache"),
            counter: work.join("counter"),
            target: root.join("target").join("fixtures"),
        }
    }

    fn computations(&self) -> usize {
        common::count_lines(&self.counter)
    }

    /// Builds the fixture with `function` as its cached function, runs it, returns the value.
    fn run(&self, function: &str) -> u64 {
        let main = MAIN.replace("@FUNCTION@", function);
        std::fs::write(self.dir.join("src/main.rs"), main).unwrap();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let build = Command::new(cargo)
            .args(["build", "--quiet", "--offline"])
            .current_dir(&self.dir)
            .env("CARGO_TARGET_DIR", &self.target)
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "building the fixture failed:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let binary = self.target.join("debug").join(format!(
            "{}{}",
            self.name,
            std::env::consts::EXE_SUFFIX
        ));
        let run = Command::new(binary)
            .env("MEMO_DIR", &self.cache)
            .env_remove("MEMO_DISABLE")
            .env("MEMO_TEST_COUNTER", &self.counter)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "the fixture failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        stdout
            .trim()
            .strip_prefix("value=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected output: {stdout}"))
    }

    /// The version folders of the fixture's function, with their `source.rs`.
    fn versions(&self) -> Vec<(String, String)> {
        let crate_name = self.name.replace('-', "_");
        let function = self.cache.join("v1").join(format!("{crate_name}.compute"));
        let mut versions: Vec<(String, String)> = std::fs::read_dir(&function)
            .unwrap()
            .flatten()
            .map(|e| {
                let source = std::fs::read_to_string(e.path().join("source.rs")).unwrap();
                (e.file_name().to_string_lossy().into_owned(), source)
            })
            .collect();
        versions.sort();
        versions
    }
}

#[test]
fn only_token_changes_make_a_new_version_and_old_versions_come_back() {
    let fixture = Fixture::new("memo-fixture-invalidation");

    assert_eq!(fixture.run(V1), 49);
    assert_eq!(fixture.computations(), 1, "first build computes");
    assert_eq!(fixture.run(V1), 49);
    assert_eq!(fixture.computations(), 1, "same source: served");

    assert_eq!(fixture.run(V1_COSMETIC), 49);
    assert_eq!(
        fixture.computations(),
        1,
        "whitespace, comments, doc comments and position do not make a new version"
    );

    assert_eq!(
        fixture.run(V2),
        50,
        "a changed body is never served the old value"
    );
    assert_eq!(fixture.computations(), 2);

    assert_eq!(
        fixture.run(V1),
        49,
        "switching back serves the first version's value"
    );
    assert_eq!(
        fixture.computations(),
        2,
        "from the first version's entries"
    );

    assert_eq!(fixture.run(V1_FORCED), 49);
    assert_eq!(
        fixture.computations(),
        3,
        "`version = ...` forces a new version"
    );

    let versions = fixture.versions();
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(versions.iter().any(|(_, s)| s.contains("x * x + 1")));
    assert!(versions
        .iter()
        .all(|(name, s)| name.len() == 16 && s.contains("fn compute(x: u64) -> u64")));
}

/// A cached function that depends on a tracked helper, which depends on another.
fn with_helpers(helper_body: &str, inner_body: &str) -> String {
    format!(
        "#[memo::track]
fn inner(x: u64) -> u64 {{
    {inner_body}
}}

#[memo::track(deps(inner))]
fn helper(x: u64) -> u64 {{
    {helper_body}
}}

#[cached(deps(helper))]
fn compute(x: u64) -> u64 {{
    count();
    helper(x) * x
}}"
    )
}

#[test]
fn a_changed_dependency_makes_a_new_version() {
    let fixture = Fixture::new("memo-fixture-dependencies");
    let d1 = with_helpers("inner(x) + 1", "x");
    assert_eq!(fixture.run(&d1), 56);
    assert_eq!(fixture.run(&d1), 56);
    assert_eq!(fixture.computations(), 1);

    let cosmetic = with_helpers("// one more\n    inner( x )+1", "x");
    assert_eq!(fixture.run(&cosmetic), 56);
    assert_eq!(
        fixture.computations(),
        1,
        "a comment in a helper changes nothing"
    );

    assert_eq!(fixture.run(&with_helpers("inner(x) + 2", "x")), 63);
    assert_eq!(
        fixture.computations(),
        2,
        "a changed helper makes a new version"
    );

    assert_eq!(fixture.run(&with_helpers("inner(x) + 1", "x * 1")), 56);
    assert_eq!(
        fixture.computations(),
        3,
        "a changed helper of a helper does too (transitively)"
    );

    assert_eq!(fixture.run(&d1), 56);
    assert_eq!(
        fixture.computations(),
        3,
        "switching back serves the first version"
    );
}
