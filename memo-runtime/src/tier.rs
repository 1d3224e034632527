//! The in-process memory tier: recently used entries' payloads, in front of the disk.
//!
//! Looked up by the function (its number in this process, which fixes its version) and the call's
//! encoded arguments compared byte for byte when they are short, or else by the call's full
//! 256-bit [`CacheKey`] (which covers the function, its version and the arguments): two
//! different calls can never share a slot. A slot and its key fill two aligned cache lines (a hit
//! touches no more; the tier holds more slots in its budget). Bounded in bytes: each of
//! [`SHARDS`] shards holds an equal share and forgets its oldest insertions first. Values larger
//! than an eighth of a shard's share are not kept (they would push out many small ones); they
//! are read from disk on every hit.
//!
//! A value read from the disk is kept only when nothing in its shard was computed again or
//! removed while it was read ([`Ticket`]): a slow read never puts back a value that a recompute
//! replaced or a clear removed. A hit copies its slot out under the shard's lock and is checked
//! and decoded after it (that runs the caller's code, which may call cached functions).

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use hashbrown::HashTable;

// The hash a shard's table places a key by: the 32 bits it carries, spread over 64.
use crate::chunked::spread as table_hash;
use crate::flight::Payload;
use crate::key::{Aligned, CacheKey, CallKey, SHORT_ARGS};

/// What the tier is looked up by: a function (its number in this process) and its call's short
/// encoded arguments, compared byte for byte, or else the call's full 256-bit key. Equality
/// compares all of it; the hash is computed once, when the key is made. One cache line, laid out
/// as a [`CallKey`] is: the bytes first, copied from the call key in the same aligned pieces.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct TierKey {
    /// The call's short encoded arguments, zero past `len`; or its [`CacheKey`], then zeros.
    bytes: Aligned,
    function: usize,
    /// Spread over 64 bits by [`TierKey::table_hash`].
    hash: u32,
    /// The length of the short encoded arguments, or [`DIGEST`].
    len: u8,
}

/// [`TierKey::len`] for a key made of a [`CacheKey`] (short arguments are at most
/// [`SHORT_ARGS`](crate::key::SHORT_ARGS) long).
const DIGEST: u8 = u8::MAX;

impl PartialEq for TierKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.len == other.len
            && self.function == other.function
            && self.bytes == other.bytes
    }
}

impl Eq for TierKey {}

impl TierKey {
    pub(crate) fn new(function: usize, call: &CallKey, digest: impl FnOnce() -> CacheKey) -> Self {
        // A copy of a fixed size, zero past `len` as the call key is.
        let (len, bytes) = match call.short_padded() {
            Some((len, padded)) => (len as u8, *padded),
            None => {
                let mut bytes = Aligned([0u8; SHORT_ARGS]);
                bytes.0[..32].copy_from_slice(digest().as_bytes());
                (DIGEST, bytes)
            }
        };
        // All of the bytes are hashed, a word at a time: a fixed amount of work, and the
        // multiplies of one word do not wait for the next one's loads (foldhash's loop over a
        // byte slice took twice as long). (Every bit of the hash depends on every bit of the
        // input; with Fx, part of the hash ignores the high bits of each word.)
        let mut hasher = foldhash::fast::FixedState::default().build_hasher();
        hasher.write_usize(function);
        for word in bytes.0.as_chunks::<8>().0 {
            hasher.write_u64(u64::from_le_bytes(*word));
        }
        TierKey {
            bytes,
            function,
            hash: (hasher.finish() >> 32) as u32,
            len,
        }
    }

    /// [`table_hash`] of this key.
    fn table_hash(&self) -> u64 {
        table_hash(self.hash)
    }

    #[cfg(test)]
    fn digest(function: usize, key: CacheKey) -> Self {
        TierKey::new(function, &CallKey::hashed(key), || key)
    }
}

/// A shard's slots, each with its key, placed by [`table_hash`].
type Slots = HashTable<(TierKey, Slot)>;

/// [`table_hash`] of a slot's key, for the table to move its slots when it grows.
fn slot_hash(slot: &(TierKey, Slot)) -> u64 {
    table_hash(slot.0.hash)
}

/// Independent locks, so that threads hitting different keys rarely wait for each other.
const SHARDS: usize = 16;
/// A hit reads the clock (to see whether the entry's time on disk is due a refresh) once in this
/// many hits of its slot: reading it on every hit would cost a tenth of the hit.
const CLOCK_EVERY: u32 = 64;
/// What a slot costs beyond its payload, for the byte budget: its table entry (key and slot,
/// with the table's spare room at its 7/8 load), its places in the eviction queue (which keeps up
/// to twice as many places as slots, and grows by doubling), and a shared payload's allocation.
const SLOT_OVERHEAD: u64 = ((std::mem::size_of::<TierKey>() + std::mem::size_of::<Slot>()) * 8 / 7
    + 3 * std::mem::size_of::<(u32, u32)>()
    + 32) as u64;

/// A kept payload: small ones in the slot itself (a hit then touches no other memory), larger
/// ones shared with the flight that produced them.
pub(crate) enum Bytes {
    Inline(Inline),
    Shared(Payload),
}

/// A small payload: its bytes, then their length. Aligned, so that it is copied in whole words.
#[derive(Clone, Copy)]
#[repr(align(8))]
pub(crate) struct Inline {
    bytes: [u8; INLINE],
    len: u8,
}

impl Clone for Bytes {
    fn clone(&self) -> Self {
        match self {
            // One copy of the whole block: field by field, the compiler copied it through the
            // stack in pieces that the next copy read across (a stall of the hit).
            Bytes::Inline(inline) => Bytes::Inline(*inline),
            Bytes::Shared(payload) => Bytes::Shared(Arc::clone(payload)),
        }
    }
}

/// Payloads up to this many bytes are kept inline.
const INLINE: usize = 23;

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Inline(Inline { bytes, len }) => &bytes[..*len as usize],
            Bytes::Shared(payload) => payload,
        }
    }
}

impl Bytes {
    /// Small bytes inline, else in an allocation of their own (shared when given one).
    pub(crate) fn new(payload: std::borrow::Cow<'_, [u8]>) -> Self {
        if payload.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..payload.len()].copy_from_slice(&payload);
            Bytes::Inline(Inline {
                bytes,
                len: payload.len() as u8,
            })
        } else {
            Bytes::Shared(Arc::new(payload.into_owned()))
        }
    }
}

impl From<Payload> for Bytes {
    fn from(payload: Payload) -> Self {
        if payload.len() <= INLINE {
            Bytes::new(std::borrow::Cow::Borrowed(&payload))
        } else {
            Bytes::Shared(payload)
        }
    }
}

/// One entry in memory: its payload (plain) and what its header said. One cache line, beside
/// its key's.
#[repr(align(64))]
struct Slot {
    payload: Bytes,
    facts: Facts,
    /// When this process last refreshed the entry's time on disk (for least-recently-used
    /// eviction across processes), in [`seconds`].
    touched: u32,
    /// Hits so far: the clock is read on every 64th only.
    hits: u32,
}

/// What a slot knows of its entry besides the payload: copied out with it by a hit.
#[derive(Clone, Copy)]
pub(crate) struct Facts {
    /// When the entry was created, in nanoseconds since the Unix epoch.
    created: u64,
    /// How long its computation took: seconds and nanoseconds (read back without a division).
    duration_secs: u32,
    duration_nanos: u32,
    /// The entry's size on disk (for validation callbacks).
    size: u32,
    /// Which insertion made the slot (wrapping: a stale place in the queue that matches by
    /// chance only forgets a slot early).
    generation: u32,
}

impl Facts {
    /// When the entry was created.
    pub(crate) fn created(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.created)
    }

    /// How long its computation took.
    pub(crate) fn duration(&self) -> Duration {
        Duration::new(u64::from(self.duration_secs), self.duration_nanos)
    }

    /// The entry's size on disk.
    pub(crate) fn size(&self) -> u64 {
        u64::from(self.size)
    }
}

// A key and its slot: two cache lines.
const _: () =
    assert!(std::mem::size_of::<TierKey>() <= 64 && std::mem::size_of::<(TierKey, Slot)>() == 128);

/// Seconds since 2020, from the coarse clock where the system has one (a few milliseconds off,
/// enough to tell whether an hour went by): every value kept reads it, and the precise clock
/// costs 50-70 ns a reading in a virtual machine, the coarse one 10.
fn seconds() -> u32 {
    #[cfg(unix)]
    let secs = crate::pack::now_nanos_coarse() / 1_000_000_000;
    #[cfg(not(unix))]
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    // Counted from 2020, so that 32 bits last until 2156.
    u32::try_from(secs.saturating_sub(SECONDS_FROM)).unwrap_or(u32::MAX)
}

/// 2020-01-01 in seconds since the Unix epoch: where [`seconds`] counts from.
const SECONDS_FROM: u64 = 1_577_836_800;

#[derive(Default)]
struct Shard {
    slots: Slots,
    /// Insertion order: each insertion's key hash and generation (8 bytes a place, not the key's
    /// 64; a generation is unique in its shard until it wraps, after 2^32 insertions, when a
    /// stale place that matches by chance only forgets a slot early). A replaced slot's old
    /// place is skipped.
    order: VecDeque<(u32, u32)>,
    bytes: u64,
    generation: u32,
}

impl Shard {
    /// The slot of `key`.
    fn get(&self, key: &TierKey) -> Option<&Slot> {
        self.slots
            .find(key.table_hash(), |(k, _)| k == key)
            .map(|(_, slot)| slot)
    }

    /// Forgets the slot of `key`, if any, and its bytes.
    fn remove(&mut self, key: &TierKey) {
        self.remove_where(key.hash, |k, _| k == key);
    }

    /// Forgets the slot placed by `hash` that `which` picks, if any, and its bytes.
    fn remove_where(&mut self, hash: u32, which: impl Fn(&TierKey, &Slot) -> bool) {
        if let Ok(found) = self
            .slots
            .find_entry(table_hash(hash), |(k, slot)| which(k, slot))
        {
            let ((_, slot), _) = found.remove();
            self.bytes -= cost(&slot.payload);
        }
    }

    /// Whether the place `(hash, generation)` in the queue is that of a slot still kept.
    fn current(&self, hash: u32, generation: u32) -> bool {
        self.slots
            .find(table_hash(hash), |(key, slot)| {
                is_place_of(hash, generation, key, slot)
            })
            .is_some()
    }
}

/// Whether the queue's place `(hash, generation)` is that of `slot` (of `key`). Both are compared:
/// the table offers every slot whose few control bits match, and after the generations wrap two
/// slots may share one; a place then matches only slots that are interchangeable for it, so no
/// slot loses its place (the budget could no longer push it out).
fn is_place_of(hash: u32, generation: u32, key: &TierKey, slot: &Slot) -> bool {
    key.hash == hash && slot.facts.generation == generation
}

/// A slot as a hit found it, copied out of the shard: to be checked and decoded without its lock.
pub(crate) struct Kept {
    pub(crate) payload: Bytes,
    pub(crate) facts: Facts,
    /// The entry's time on disk should be refreshed: it was last refreshed long ago.
    pub(crate) touch: bool,
}

/// Taken before an entry is read from the disk, and given back with what was read
/// ([`Tier::insert_read`]): the count of changes to the key's shard at that moment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket(u64);

/// The memory tier of one [`Memory`](crate::Memory).
pub(crate) struct Tier {
    shards: Box<[Mutex<Shard>]>,
    /// Per shard, how many times a value was computed again or removed there (changed under
    /// the shard's lock; read without it, for a [`Ticket`]).
    changes: Box<[Changes]>,
    shard_budget: u64,
    /// Set by the first value kept: until then a look-up has nothing to find and takes no lock
    /// (the first calls of a new process, which read each entry once, are not kept).
    kept_any: AtomicBool,
}

/// A shard's count of changes, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Changes(AtomicU64);

impl Tier {
    /// A tier holding at most about `bytes` bytes of payloads; `None` for 0.
    pub(crate) fn new(bytes: u64) -> Option<Self> {
        if bytes == 0 {
            return None;
        }
        Some(Tier {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            changes: (0..SHARDS).map(|_| Changes::default()).collect(),
            shard_budget: (bytes / SHARDS as u64).max(1),
            kept_any: AtomicBool::new(false),
        })
    }

    /// The shard of `key`, locked, and its count of changes.
    fn shard(&self, key: &TierKey) -> (std::sync::MutexGuard<'_, Shard>, &AtomicU64) {
        let index = shard_of(key);
        let shard = self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (shard, &self.changes[index].0)
    }

    /// What a reading of `key`'s entry from the disk takes first, for [`Tier::insert_read`].
    pub(crate) fn ticket(&self, key: &TierKey) -> Ticket {
        Ticket(self.changes[shard_of(key)].0.load(Ordering::Acquire))
    }

    /// Looks `key` up: a copy of its slot (a small payload is copied, a larger one shared), to
    /// be checked and decoded once the shard's lock is let go.
    pub(crate) fn get(&self, key: &TierKey, touch_after: Duration) -> Option<Kept> {
        if !self.kept_any.load(Ordering::Acquire) {
            return None;
        }
        let (mut shard, _) = self.shard(key);
        let (_, slot) = shard.slots.find_mut(key.table_hash(), |(k, _)| k == key)?;
        slot.hits = slot.hits.wrapping_add(1);
        let touch = slot.hits % CLOCK_EVERY == 0 && {
            let now = seconds();
            let due =
                Duration::from_secs(u64::from(now.saturating_sub(slot.touched))) > touch_after;
            if due {
                slot.touched = now;
            }
            due
        };
        Some(Kept {
            payload: slot.payload.clone(),
            facts: slot.facts,
            touch,
        })
    }

    /// Whether `key` has a slot (without counting a hit).
    pub(crate) fn contains(&self, key: &TierKey) -> bool {
        self.kept_any.load(Ordering::Acquire) && self.shard(key).0.get(key).is_some()
    }

    /// Forgets the slot a hit found (a value not fresh any more, or that does not decode),
    /// unless another value took its place meanwhile.
    pub(crate) fn discard(&self, key: &TierKey, kept: &Kept) {
        let (mut shard, _) = self.shard(key);
        let generation = kept.facts.generation;
        shard.remove_where(key.hash, |k, slot| {
            k == key && slot.facts.generation == generation
        });
    }

    /// The largest payload it keeps, in bytes: larger ones are not worth copying for it.
    pub(crate) fn largest(&self) -> usize {
        (self.shard_budget / 8).saturating_sub(SLOT_OVERHEAD) as usize
    }

    /// Keeps a value just computed (and stored), replacing any slot of the same key, and forgets
    /// the oldest slots of its shard beyond the budget. Too large a payload is not kept, and the
    /// key's slot goes (a refreshed call may have given a different value).
    pub(crate) fn insert(
        &self,
        key: TierKey,
        payload: impl Into<Bytes>,
        created: SystemTime,
        duration: Duration,
        size: u64,
    ) {
        self.put(key, None, payload.into(), created, duration, size);
    }

    /// [`Tier::insert`] for a value read from the disk after `ticket` was taken: not kept when
    /// a value of the key's shard was computed again or removed meanwhile (what was read may be
    /// what that replaced).
    pub(crate) fn insert_read(
        &self,
        key: TierKey,
        ticket: Ticket,
        payload: impl Into<Bytes>,
        created: SystemTime,
        duration: Duration,
        size: u64,
    ) {
        self.put(key, Some(ticket), payload.into(), created, duration, size);
    }

    fn put(
        &self,
        key: TierKey,
        read: Option<Ticket>,
        payload: Bytes,
        created: SystemTime,
        duration: Duration,
        size: u64,
    ) {
        let (mut shard, changes) = self.shard(&key);
        let shard = &mut *shard;
        match read {
            Some(Ticket(then)) if changes.load(Ordering::Relaxed) != then => return,
            Some(_) => {}
            None => {
                changes.fetch_add(1, Ordering::Release);
            }
        }
        let bytes = cost(&payload);
        let (Ok(size), Ok(created)) = (
            u32::try_from(size),
            created.duration_since(SystemTime::UNIX_EPOCH),
        ) else {
            // Larger than a slot records (never under the default budget), or created before
            // 1970 (a clock set wrong): not kept.
            shard.remove(&key);
            return;
        };
        if bytes > self.shard_budget / 8 {
            shard.remove(&key);
            return;
        }
        shard.generation = shard.generation.wrapping_add(1);
        let generation = shard.generation;
        let slot = Slot {
            payload,
            facts: Facts {
                created: u64::try_from(created.as_nanos()).unwrap_or(u64::MAX),
                duration_secs: u32::try_from(duration.as_secs()).unwrap_or(u32::MAX),
                duration_nanos: duration.subsec_nanos(),
                size,
                generation,
            },
            touched: seconds(),
            hits: 0,
        };
        self.kept_any.store(true, Ordering::Release);
        match shard
            .slots
            .entry(key.table_hash(), |(k, _)| *k == key, slot_hash)
        {
            hashbrown::hash_table::Entry::Occupied(mut found) => {
                let old = std::mem::replace(&mut found.get_mut().1, slot);
                shard.bytes -= cost(&old.payload);
            }
            hashbrown::hash_table::Entry::Vacant(place) => {
                place.insert((key, slot));
            }
        }
        shard.bytes += bytes;
        shard.order.push_back((key.hash, generation));
        while shard.bytes > self.shard_budget {
            let Some((hash, generation)) = shard.order.pop_front() else {
                break;
            };
            shard.remove_where(hash, |key, slot| is_place_of(hash, generation, key, slot));
        }
        // Replaced slots leave stale places in the queue: drop them when they dominate.
        if shard.order.len() > 2 * shard.slots.len() + 64 {
            let mut order = std::mem::take(&mut shard.order);
            order.retain(|&(hash, generation)| shard.current(hash, generation));
            shard.order = order;
        }
    }

    /// Forgets every slot of one function (by its number in this process).
    pub(crate) fn remove_function(&self, function: usize) {
        self.retain(|key| key.function != function);
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        self.retain(|_| false);
    }

    fn retain(&self, keep: impl Fn(&TierKey) -> bool) {
        for (shard, changes) in self.shards.iter().zip(self.changes.iter()) {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let shard = &mut *shard;
            changes.0.fetch_add(1, Ordering::Release);
            let mut freed = 0;
            shard.slots.retain(|(key, slot)| {
                let kept = keep(key);
                if !kept {
                    freed += cost(&slot.payload);
                }
                kept
            });
            shard.bytes -= freed;
            if shard.slots.is_empty() {
                shard.order.clear();
            }
        }
    }

    /// Bytes held, with bookkeeping.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).bytes)
            .sum()
    }
}

/// The shard of a key: the top bits of its hash. (The shard's table places a key by the low bits
/// of the hash times an odd number, which depend only on the hash's low bits, and tells keys
/// apart by the top bits of that product, which depend on all of them.)
fn shard_of(key: &TierKey) -> usize {
    (key.hash >> (32 - SHARDS.trailing_zeros())) as usize % SHARDS
}

fn cost(payload: &[u8]) -> u64 {
    payload.len() as u64 + SLOT_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    fn key(n: u16) -> TierKey {
        let mut bytes = [0u8; 32];
        bytes[..2].copy_from_slice(&n.to_le_bytes());
        TierKey::digest(1, CacheKey::from_bytes(bytes))
    }

    fn put(tier: &Tier, n: u16, len: usize) {
        let payload = Arc::new(vec![n as u8; len]);
        tier.insert(key(n), payload, SystemTime::now(), Duration::ZERO, 0);
    }

    /// Whether every slot of `shard` has its place in the eviction queue (else the budget could
    /// never push it out).
    fn every_slot_has_its_place(shard: &Shard) -> bool {
        shard
            .slots
            .iter()
            .all(|(key, slot)| shard.order.contains(&(key.hash, slot.facts.generation)))
    }

    fn value(tier: &Tier, n: u16) -> Option<Vec<u8>> {
        tier.get(&key(n), Duration::MAX)
            .map(|kept| kept.payload.to_vec())
    }

    /// Asserts that 256 keys differing in one byte have at least 255 hashes and reach every
    /// shard.
    fn assert_spread(keys: impl Iterator<Item = TierKey> + Clone, what: &str) {
        let hashes: HashSet<u32> = keys.clone().map(|k| k.hash).collect();
        let shards: HashSet<usize> = keys.map(|k| shard_of(&k)).collect();
        assert!(hashes.len() >= 255, "{what}: {} hashes", hashes.len());
        assert_eq!(shards.len(), SHARDS, "{what}");
    }

    #[test]
    fn every_byte_of_a_key_moves_its_hash_and_shard() {
        // Keys that differ in one byte only, wherever it is (the high bytes of a word too),
        // spread over hashes and shards.
        for at in 0..32 {
            let keys = (0..=255u8).map(|b| {
                let mut bytes = [7u8; 32];
                bytes[at] = b;
                TierKey::digest(1, CacheKey::from_bytes(bytes))
            });
            assert_spread(keys, &format!("byte {at}"));
        }
    }

    #[test]
    fn every_byte_of_short_arguments_and_the_function_move_the_hash_and_shard() {
        // Short arguments that differ in one byte only, wherever it is in the 48.
        for at in 0..SHORT_ARGS {
            let keys = (0..=255u8).map(|b| {
                let mut bytes = [7u8; SHORT_ARGS];
                bytes[at] = b;
                TierKey::new(
                    1,
                    &CallKey::short(bytes, SHORT_ARGS as u8),
                    || unreachable!(),
                )
            });
            assert_spread(keys, &format!("byte {at}"));
        }
        // The same arguments for different functions.
        let call = CallKey::short([0; SHORT_ARGS], 2);
        let hashes: HashSet<u32> = (0..256usize)
            .map(|function| TierKey::new(function * 64, &call, || unreachable!()).hash)
            .collect();
        assert!(hashes.len() >= 255, "{} hashes", hashes.len());
    }

    #[test]
    fn payloads_of_every_small_length_come_back_whole() {
        // Inline up to INLINE bytes, shared beyond: both sides of the line, each byte distinct.
        let tier = Tier::new(1 << 20).unwrap();
        for len in 0..=2 * INLINE {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let bytes = Bytes::new(std::borrow::Cow::Borrowed(&payload));
            assert_eq!(matches!(bytes, Bytes::Inline(_)), len <= INLINE);
            assert_eq!(&*bytes.clone(), &payload[..]);
            tier.insert(key(len as u16), bytes, SystemTime::now(), Duration::ZERO, 0);
        }
        for len in 0..=2 * INLINE {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            assert_eq!(value(&tier, len as u16), Some(payload), "length {len}");
        }
    }

    #[test]
    fn keys_never_share_a_slot() {
        let tier = Tier::new(1 << 20).unwrap();
        put(&tier, 1, 10);
        put(&tier, 2, 10);
        assert_eq!(value(&tier, 1), Some(vec![1; 10]));
        assert_eq!(value(&tier, 2), Some(vec![2; 10]));
        assert_eq!(value(&tier, 3), None);
    }

    #[test]
    fn the_budget_is_kept_by_forgetting_the_oldest() {
        // 16 shards of 16 KiB; each slot costs 100 bytes + the overhead.
        let tier = Tier::new(256 * 1024).unwrap();
        let each = cost(&[0; 100]);
        for n in 0..1000 {
            put(&tier, n, 100);
        }
        assert!(tier.bytes() <= 256 * 1024, "{} bytes", tier.bytes());
        assert!(
            tier.bytes() > 256 * 1024 - 16 * each,
            "{} bytes",
            tier.bytes()
        );
        let kept = (0..1000).filter(|&n| value(&tier, n).is_some()).count();
        assert_eq!(kept as u64, tier.bytes() / each);
        assert_eq!(value(&tier, 0), None);
        assert_eq!(value(&tier, 999), Some(vec![(999 % 256) as u8; 100]));
        // Replacing a key does not count it twice.
        let before = tier.bytes();
        put(&tier, 999, 100);
        assert_eq!(tier.bytes(), before);
    }

    /// Keys sharing a hash are told apart by their bytes on a look-up, and by their generations
    /// when the queue forgets the oldest slot (its place holds no key); the places of replaced
    /// slots are skipped, and dropped once they dominate the queue.
    #[test]
    fn slots_sharing_a_hash_are_told_apart_and_stale_places_go() {
        let forged = |n: u16| TierKey { hash: 7, ..key(n) };
        let insert = |tier: &Tier, n: u16, len: usize| {
            let payload = Arc::new(vec![n as u8; len]);
            tier.insert(forged(n), payload, SystemTime::now(), Duration::ZERO, 0);
        };
        let get = |tier: &Tier, n: u16| {
            tier.get(&forged(n), Duration::MAX)
                .map(|kept| kept.payload.to_vec())
        };
        // Room for 8 slots of 100 bytes in each shard (a slot may take an eighth of it).
        let each = cost(&[0; 100]);
        let tier = Tier::new(16 * (8 * each + each / 2)).unwrap();
        for n in 1..=7 {
            insert(&tier, n, 100);
        }
        for n in 1..=7 {
            assert_eq!(get(&tier, n), Some(vec![n as u8; 100]), "{n}");
        }
        assert_eq!(get(&tier, 8), None);
        // 1 is replaced (its first place goes stale), then a ninth slot is one too many: the
        // oldest current slot goes, 2, not 1.
        insert(&tier, 1, 100);
        insert(&tier, 8, 100);
        insert(&tier, 9, 100);
        assert_eq!(get(&tier, 2), None);
        for n in [1, 3, 4, 5, 6, 7, 8, 9] {
            assert_eq!(get(&tier, n), Some(vec![n as u8; 100]), "{n}");
        }
        assert_eq!(tier.bytes(), 8 * each);
        for _ in 0..500 {
            insert(&tier, 9, 100);
        }
        let shard = tier.shards[shard_of(&forged(9))].lock().unwrap();
        assert_eq!(shard.slots.len(), 8);
        assert!(shard.order.len() <= 2 * 8 + 64 + 1, "{}", shard.order.len());
        assert!(every_slot_has_its_place(&shard));
    }

    /// After a shard's generations wrap (2^32 insertions), a new slot may get the generation of
    /// an old one; even when the table cannot tell their hashes apart by its control bits, each
    /// keeps a place of its own in the queue, and the budget still pushes both out.
    #[test]
    fn after_the_generations_wrap_every_slot_keeps_its_place() {
        let control = |hash: u32| table_hash(hash) >> 57;
        let each = cost(&[0; 100]);
        for first in 1..=64u32 {
            // Hashes of shard 0 (the top bits) with the same control bits.
            let second = (first + 1..)
                .find(|&h| control(h) == control(first))
                .unwrap();
            assert!(second < 1 << 28);
            let tier = Tier::new(16 * (8 * each + each / 2)).unwrap();
            let forged = |n: u16, hash: u32| TierKey { hash, ..key(n) };
            let insert = |n: u16, hash: u32| {
                let payload = Arc::new(vec![n as u8; 100]);
                tier.insert(
                    forged(n, hash),
                    payload,
                    SystemTime::now(),
                    Duration::ZERO,
                    0,
                );
            };
            let placed = || every_slot_has_its_place(&tier.shards[0].lock().unwrap());
            insert(1, first);
            // As 2^32 insertions later: the next slot gets the first one's generation.
            tier.shards[0].lock().unwrap().generation -= 1;
            insert(2, second);
            for n in 3..=20 {
                insert(n, 1000 + u32::from(n));
                assert!(placed(), "hashes {first} and {second}, slot {n}");
            }
            assert_eq!(
                tier.get(&forged(1, first), Duration::MAX)
                    .map(|k| k.payload.len()),
                None
            );
            assert_eq!(
                tier.get(&forged(2, second), Duration::MAX)
                    .map(|k| k.payload.len()),
                None
            );
            assert!(tier.bytes() <= 16 * (8 * each + each / 2));
        }
    }

    #[test]
    fn a_slot_gives_back_the_times_and_size_it_was_given() {
        let tier = Tier::new(1 << 20).unwrap();
        let created = SystemTime::UNIX_EPOCH + Duration::new(1_764_000_000, 123_456_789);
        let duration = Duration::new(90_061, 999_999_999);
        tier.insert(key(1), Arc::new(vec![1; 40]), created, duration, 4242);
        let kept = tier.get(&key(1), Duration::MAX).unwrap();
        let facts = kept.facts;
        assert_eq!(
            (facts.created(), facts.duration(), facts.size()),
            (created, duration, 4242)
        );
        assert_eq!(kept.payload.len(), 40);
        // A size the slot cannot record is not kept.
        tier.insert(key(2), Arc::new(vec![2; 40]), created, duration, 1 << 32);
        assert_eq!(value(&tier, 2), None);
    }

    #[test]
    fn large_values_are_not_kept_and_zero_means_no_tier() {
        let tier = Tier::new(16 * 1024).unwrap();
        put(&tier, 1, 200);
        assert_eq!(value(&tier, 1), None);
        // A key whose new value is too large loses its old one (a refreshed call).
        let tier = Tier::new(1 << 20).unwrap();
        put(&tier, 2, 10);
        assert_eq!(value(&tier, 2), Some(vec![2; 10]));
        put(&tier, 2, 10_000);
        assert_eq!(value(&tier, 2), None);
        assert_eq!(tier.bytes(), 0);
        assert!(Tier::new(0).is_none());
    }

    #[test]
    fn a_refused_value_and_removals_free_their_bytes() {
        let tier = Tier::new(1 << 20).unwrap();
        put(&tier, 1, 10);
        put(&tier, 2, 10);
        let kept = tier.get(&key(1), Duration::MAX).unwrap();
        tier.discard(&key(1), &kept);
        assert_eq!(value(&tier, 1), None);
        tier.remove_function(1);
        assert_eq!(tier.bytes(), 0);
        put(&tier, 3, 10);
        tier.remove_function(1);
        assert_eq!(value(&tier, 3), None);
        assert_eq!(tier.bytes(), 0);
    }

    #[test]
    fn a_slot_replaced_after_a_hit_is_not_discarded_by_it() {
        let tier = Tier::new(1 << 20).unwrap();
        put(&tier, 1, 10);
        let kept = tier.get(&key(1), Duration::MAX).unwrap();
        put(&tier, 1, 20);
        tier.discard(&key(1), &kept);
        assert_eq!(value(&tier, 1), Some(vec![1; 20]));
    }

    #[test]
    fn a_value_read_while_its_shard_changed_is_not_kept() {
        let tier = Tier::new(1 << 20).unwrap();
        let read = |n: u16, ticket: Ticket, len: usize| {
            let payload = Arc::new(vec![n as u8; len]);
            tier.insert_read(
                key(n),
                ticket,
                payload,
                SystemTime::now(),
                Duration::ZERO,
                0,
            );
        };
        // Nothing changed since the reading began: kept.
        let ticket = tier.ticket(&key(1));
        read(1, ticket, 10);
        assert_eq!(value(&tier, 1), Some(vec![1; 10]));
        // Computed again while an older value was read: the read one is not kept.
        let ticket = tier.ticket(&key(1));
        put(&tier, 1, 20);
        read(1, ticket, 10);
        assert_eq!(value(&tier, 1), Some(vec![1; 20]));
        // Removed (cleared) while it was read: not put back.
        let ticket = tier.ticket(&key(1));
        tier.clear();
        read(1, ticket, 10);
        assert_eq!(value(&tier, 1), None);
        let ticket = tier.ticket(&key(1));
        read(1, ticket, 10);
        assert_eq!(value(&tier, 1), Some(vec![1; 10]));
    }
}
