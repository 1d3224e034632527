#![deny(warnings)]
// Tracked helpers in modules, transitive dependencies, a cached function as a dependency.

use memo::prelude::*;

mod helpers {
    #[memo::track]
    pub fn scale(x: u64) -> u64 {
        x * 10
    }

    #[memo::track(deps(scale))]
    pub fn shifted(x: u64) -> u64 {
        scale(x) + 1
    }
}

#[cached]
fn base(x: u64) -> u64 {
    x + 2
}

#[cached(deps(helpers::shifted, base))]
fn combined(x: u64) -> u64 {
    helpers::shifted(x) + base(x)
}

fn main() {
    std::env::set_var("MEMO_DIR", std::env::temp_dir().join("memo-ui-dependencies"));
    assert_eq!(combined(1), 11 + 3);
    assert_ne!(combined::version(), base::version());
}
