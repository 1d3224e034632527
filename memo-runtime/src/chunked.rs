//! A hash table that holds its items' positions, and the items in chunks that never move.
//!
//! For the packs' index (72-byte items, one per entry). A table holding its items in its buckets
//! copies them all when it doubles and touches every page of its new size, each page a fault
//! that costs microseconds on a virtual machine: the call that stored a version's 3,585th entry
//! took 0.4 ms, the one that stored its 917,505th 107 ms. Here a bucket holds an item's 4-byte
//! position and 32 bits of its hash (growing never reads the items), and the items sit in chunks
//! of [`CHUNK`] that never move once full, their pages touched one by one as items fill them:
//! that call now takes 20 ms. The room kept empty is that of buckets, and of the last chunk's
//! items, whose pages are not touched until items fill them (a million entries: 164 instead of
//! 230 MB resident, with the memory tier).

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

/// [`CHUNK`] as a power of two.
const CHUNK_BITS: u32 = 10;
/// Items per chunk: 1,024 (72 KiB of the index's items, from the heap rather than a mapping of
/// its own).
const CHUNK: usize = 1 << CHUNK_BITS;

/// What an item is placed by: a hash of its key, the same every time (a look-up of the key
/// passes the same hash).
pub(crate) trait Placed {
    /// The item's hash.
    fn place(&self) -> u64;
}

/// Items found by a hash and a comparison, as in [`hashbrown::HashTable`].
pub(crate) struct Table<T> {
    /// Each item's position in `chunks`, and the top 32 bits of its hash: the table grows
    /// without reading the items (a read each, all over memory, took most of the time).
    positions: HashTable<(u32, u32)>,
    /// The items, `positions.len()` of them, in order: every chunk but the last holds [`CHUNK`],
    /// and no chunk ever holds more (so none moves once full).
    chunks: Vec<Vec<T>>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            positions: HashTable::new(),
            chunks: Vec::new(),
        }
    }
}

impl<T> std::fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.positions.len())
            .finish_non_exhaustive()
    }
}

/// The 32 bits of `hash` a bucket keeps.
fn short(hash: u64) -> u32 {
    (hash >> 32) as u32
}

/// What a hash table places 32 bits of hash by: spread over 64 (`hashbrown` picks a place by the
/// low bits and tells entries apart by the top ones). Here and in the memory tier's shards.
pub(crate) fn spread(short: u32) -> u64 {
    u64::from(short).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What the table places a bucket by, when it grows.
fn bucket_hash(&(_, short): &(u32, u32)) -> u64 {
    spread(short)
}

/// The item at position `at` (one the table holds: every position it holds is filled).
fn item<T>(chunks: &[Vec<T>], at: u32) -> &T {
    &chunks[(at >> CHUNK_BITS) as usize][at as usize & (CHUNK - 1)]
}

/// [`item`], to change.
fn item_mut<T>(chunks: &mut [Vec<T>], at: u32) -> &mut T {
    &mut chunks[(at >> CHUNK_BITS) as usize][at as usize & (CHUNK - 1)]
}

impl<T: Placed> Table<T> {
    /// The item placed by `hash` that `eq` picks.
    pub(crate) fn find(&self, hash: u64, eq: impl Fn(&T) -> bool) -> Option<&T> {
        let (chunks, short) = (&self.chunks, short(hash));
        self.positions
            .find(spread(short), |&(at, h)| h == short && eq(item(chunks, at)))
            .map(|&(at, _)| item(chunks, at))
    }

    /// Puts `new` in, unless `eq` picks an item placed as it is: then that item and `new` go to
    /// `merge` (which must leave the item's key, and so its place, as it was). When the table
    /// already holds as many items as a position can name (2^32, about 300 GB of pack index
    /// entries), `new` is dropped (not found later).
    pub(crate) fn upsert(
        &mut self,
        eq: impl Fn(&T) -> bool,
        new: T,
        merge: impl FnOnce(&mut T, T),
    ) {
        let Table { positions, chunks } = self;
        let (filled, short) = (positions.len(), short(new.place()));
        let same = |&(at, h): &(u32, u32)| h == short && eq(item(chunks, at));
        match positions.entry(spread(short), same, bucket_hash) {
            Entry::Occupied(present) => merge(item_mut(chunks, present.get().0), new),
            Entry::Vacant(place) => {
                if let Ok(at) = u32::try_from(filled) {
                    // The item first: a position never names a missing item, even if the push
                    // could not allocate.
                    push(chunks, new);
                    place.insert((at, short));
                }
            }
        }
    }

    /// Keeps only the items `keep` says to keep, in the order they were. Unless it keeps them all,
    /// all of it is rebuilt (its buckets kept), each item's hash computed again.
    pub(crate) fn retain(&mut self, keep: impl Fn(&T) -> bool) {
        if self.chunks.iter().flatten().all(&keep) {
            return;
        }
        let old = std::mem::take(&mut self.chunks);
        self.positions.clear();
        for kept in old.into_iter().flatten() {
            if keep(&kept) {
                let Table { positions, chunks } = self;
                // Fewer than before, so a position names each.
                let at = positions.len() as u32;
                let short = short(kept.place());
                push(chunks, kept);
                positions.insert_unique(spread(short), (at, short), bucket_hash);
            }
        }
    }

    /// Every item, in order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    /// Makes room for `more` items ahead, if memory allows (in the last chunk as far as it
    /// goes, and in the table).
    pub(crate) fn try_reserve(&mut self, more: usize) {
        let Table { positions, chunks } = self;
        if let Some(last) = chunks.last_mut() {
            let _ = last.try_reserve_exact(more.min(CHUNK - last.len()));
        } else {
            let mut first = Vec::new();
            if first.try_reserve_exact(more.min(CHUNK)).is_ok() {
                chunks.push(first);
            }
        }
        let _ = positions.try_reserve(more, bucket_hash);
    }
}

/// Puts `new` after the last item: in the last chunk, grown as needed up to [`CHUNK`], or else a
/// new one.
fn push<T>(chunks: &mut Vec<Vec<T>>, new: T) {
    match chunks.last_mut() {
        Some(last) if last.len() < CHUNK => {
            if last.len() == last.capacity() {
                // Small tables stay small: the first chunk grows by doubling.
                last.reserve_exact(last.len().max(4).min(CHUNK - last.len()));
            }
            last.push(new);
        }
        _ => {
            let mut chunk = Vec::with_capacity(if chunks.is_empty() { 4 } else { CHUNK });
            chunk.push(new);
            chunks.push(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key, a value, and a hash made to collide for many keys.
    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        key: u64,
        value: u64,
    }

    impl Placed for Item {
        fn place(&self) -> u64 {
            // 64 keys share each hash.
            (self.key / 64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        }
    }

    fn put(table: &mut Table<Item>, key: u64, value: u64) {
        let new = Item { key, value };
        table.upsert(
            |item| item.key == key,
            new,
            |present, new| {
                present.value += new.value;
            },
        );
    }

    fn get(table: &Table<Item>, key: u64) -> Option<u64> {
        let hash = Item { key, value: 0 }.place();
        table
            .find(hash, |item| item.key == key)
            .map(|item| item.value)
    }

    /// Over several chunks, with keys that share hashes: every key finds its own value, merged
    /// values included, and absent keys find nothing.
    #[test]
    fn every_key_finds_its_own_item_across_chunks() {
        let n = 3 * CHUNK as u64 + 17;
        let mut table = Table::default();
        for key in 0..n {
            put(&mut table, key, key * 10);
        }
        for key in (0..n).step_by(3) {
            put(&mut table, key, 1);
        }
        assert_eq!(table.iter().count(), n as usize);
        for key in 0..n {
            let merged = u64::from(key % 3 == 0);
            assert_eq!(get(&table, key), Some(key * 10 + merged), "key {key}");
        }
        assert_eq!(get(&table, n), None);
        assert_eq!(get(&table, u64::MAX), None);
    }

    /// A full chunk's items stay where they are while the table grows (its positions are
    /// moved, not the items).
    #[test]
    fn items_of_a_full_chunk_never_move() {
        let mut table = Table::default();
        table.try_reserve(10);
        for key in 0..CHUNK as u64 {
            put(&mut table, key, key);
        }
        let at = |table: &Table<Item>, key: u64| -> *const Item {
            table
                .find(Item { key, value: 0 }.place(), |item| item.key == key)
                .unwrap()
        };
        let (first, last) = (at(&table, 0), at(&table, CHUNK as u64 - 1));
        for key in CHUNK as u64..20 * CHUNK as u64 {
            put(&mut table, key, key);
        }
        assert!(std::ptr::eq(first, at(&table, 0)));
        assert!(std::ptr::eq(last, at(&table, CHUNK as u64 - 1)));
        assert_eq!(
            get(&table, 20 * CHUNK as u64 - 1),
            Some(20 * CHUNK as u64 - 1)
        );
    }

    /// Room made ahead in a table part filled (as each new reading of a pack does) leaves every
    /// item where its position says.
    #[test]
    fn room_made_ahead_midway_keeps_every_position_right() {
        let mut table = Table::default();
        for key in 0..1_500 {
            put(&mut table, key, key);
        }
        table.try_reserve(5_000);
        for key in 1_500..5_000 {
            put(&mut table, key, key);
        }
        table.try_reserve(10);
        table.try_reserve(3 * CHUNK);
        for key in 0..5_000 {
            assert_eq!(get(&table, key), Some(key), "key {key}");
        }
        assert!(table.iter().map(|item| item.key).eq(0..5_000));
    }

    /// Retaining keeps exactly the items asked for, each still found by its key, and the table
    /// goes on taking new ones.
    #[test]
    fn retain_keeps_what_it_is_told_and_finds_it_after() {
        let n = 2 * CHUNK as u64 + 5;
        let mut table = Table::default();
        for key in 0..n {
            put(&mut table, key, key + 1);
        }
        table.retain(|_| true);
        assert_eq!(get(&table, 10), Some(11));
        table.retain(|item| item.key % 5 != 0);
        for key in 0..n {
            let expected = (key % 5 != 0).then_some(key + 1);
            assert_eq!(get(&table, key), expected, "key {key}");
        }
        let kept: Vec<u64> = table.iter().map(|item| item.key).collect();
        let expected: Vec<u64> = (0..n).filter(|key| key % 5 != 0).collect();
        assert_eq!(kept, expected);
        for key in n..n + CHUNK as u64 {
            put(&mut table, key, 7);
        }
        put(&mut table, 1, 100);
        assert_eq!(get(&table, 1), Some(102));
        assert_eq!(get(&table, 5), None);
        assert_eq!(get(&table, n + 3), Some(7));
        table.retain(|_| false);
        assert_eq!(table.iter().count(), 0);
        assert_eq!(get(&table, 1), None);
    }
}
