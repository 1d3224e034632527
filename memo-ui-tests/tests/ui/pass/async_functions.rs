#![deny(warnings)]
// `async fn`, free and in an impl block, with the handle's async functions.

use memo::prelude::*;

#[cached]
async fn double(x: u64) -> u64 {
    x * 2
}

struct Service;

impl Service {
    #[cached(ignore(self))]
    async fn lookup(&self, id: u32) -> Option<String> {
        Some(id.to_string())
    }
}

fn main() {
    std::env::set_var("MEMO_DIR", std::env::temp_dir().join("memo-ui-async"));
    pollster::block_on(async {
        assert_eq!(double(2).await, 4);
        assert_eq!(double::recompute(2).await, 4);
        assert_eq!(double::call_uncached(3).await, 6);
        assert!(double::is_cached(2));
        assert_eq!(Service.lookup(7).await, Some("7".into()));
    });
}
