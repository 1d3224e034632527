//! Entry encoding: a fixed 72-byte header followed by the rmp-serde payload.
//!
//! The format is described for people in `docs/FORMAT.md`; the constants here are the single
//! source of truth, and the unit tests below pin the exact bytes.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MEMO` |
//! | 4 | 2 | format version, u16 little-endian ([`FORMAT_VERSION`]) |
//! | 6 | 2 | flags, u16 little-endian: bit 0 ([`FLAG_ZSTD`]) the payload is zstd-compressed; bit 1 ([`FLAG_NUMBERS`]) the (plain) payload is raw numbers instead of MessagePack; bit 2 ([`FLAG_BLOCKS`]) the checksum covers the payload's blocks' checksums; other bits reserved (an entry with one set is not read) |
//! | 8 | 32 | the entry's [`CacheKey`] |
//! | 40 | 8 | created, nanoseconds since the Unix epoch, u64 little-endian |
//! | 48 | 8 | compute duration in nanoseconds, u64 little-endian |
//! | 56 | 8 | payload length in bytes, u64 little-endian |
//! | 64 | 8 | checksum: XXH3-64 of bytes 0..64 followed by the payload, u64 little-endian; with [`FLAG_BLOCKS`], followed instead by the XXH3-64 (u64 little-endian) of each [`CHECKSUM_BLOCK`] bytes of the payload in turn, the last block possibly shorter |
//! | 72 | n | payload: the value in MessagePack, structs as maps with field names; or, with [`FLAG_NUMBERS`], a `Vec` of primitive numbers as the element's key tag, 7 zero bytes, then the elements in little-endian |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use crate::key::CacheKey;

/// The four bytes every entry starts with.
pub const MAGIC: [u8; 4] = *b"MEMO";
/// The entry format this build writes and reads. Entries of any other version are misses.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 72;
/// Header flag: the payload is the MessagePack bytes compressed with zstd.
pub const FLAG_ZSTD: u16 = 1;
/// Header flag: the plain payload is a `Vec` of primitive numbers as raw little-endian bytes
/// (after an 8-byte prefix: the element's tag, then zeros), not MessagePack.
pub const FLAG_NUMBERS: u16 = 2;
/// Header flag: the checksum covers the checksums of the payload's blocks of [`CHECKSUM_BLOCK`]
/// bytes instead of the payload itself, so that several cores compute and verify it. Set on
/// payloads from [`BLOCKS_FROM`] bytes.
pub const FLAG_BLOCKS: u16 = 4;
/// The size of a payload's blocks under [`FLAG_BLOCKS`] (the last one may be shorter).
pub const CHECKSUM_BLOCK: usize = 1 << 20;
/// Payloads from this size are written with [`FLAG_BLOCKS`].
pub const BLOCKS_FROM: usize = 2 * CHECKSUM_BLOCK;
const KNOWN_FLAGS: u16 = FLAG_ZSTD | FLAG_NUMBERS | FLAG_BLOCKS;
const CHECKSUM_AT: usize = 64;

/// What an entry's header says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    /// The key the entry was written for.
    pub key: CacheKey,
    /// When the value was computed.
    pub created: SystemTime,
    /// How long the computation took.
    pub duration: Duration,
    /// Length of the payload in bytes (as stored: compressed when `compressed`).
    pub payload_len: u64,
    /// Whether the payload is zstd-compressed ([`FLAG_ZSTD`]).
    pub compressed: bool,
    /// Whether the plain payload is raw numbers ([`FLAG_NUMBERS`]).
    pub numbers: bool,
    /// Whether the checksum covers the payload's blocks' checksums ([`FLAG_BLOCKS`]).
    pub blocks: bool,
}

/// Why stored bytes are not a valid entry. Any of these makes the entry a miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptEntry {
    /// Shorter than a header.
    #[error("{len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// The length found.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    #[error("not a memo entry (bad magic bytes)")]
    BadMagic,
    /// Written by another format version.
    #[error("entry format version {found} (this build reads version {FORMAT_VERSION})")]
    OtherVersion {
        /// The version found.
        found: u16,
    },
    /// Flags this build does not understand.
    #[error("unknown entry flags {flags:#06x}")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// The header names another key: the file is not the entry that was asked for.
    #[error("entry belongs to another key")]
    KeyMismatch,
    /// The payload length in the header does not match the bytes present.
    #[error("header says {claimed} payload bytes but {present} are present (truncated or padded)")]
    LengthMismatch {
        /// Length the header claims.
        claimed: u64,
        /// Bytes actually present after the header.
        present: u64,
    },
    /// The checksum does not match: some byte changed.
    #[error("checksum mismatch (damaged entry)")]
    ChecksumMismatch,
    /// A compressed payload does not decompress.
    #[error("compressed payload does not decompress: {0}")]
    Decompress(String),
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn checksum(header: &[u8], payload: &[u8], blocks: bool) -> u64 {
    if let Some(sum) = one_shot(header, payload, blocks) {
        return sum;
    }
    let mut checksum = Running::new(header, blocks);
    checksum.update_rest(payload);
    checksum.digest()
}

/// Entries up to this many bytes before the checksum and of payload have their checksum computed
/// in one call, on a copy of those bytes joined on the stack: the streaming hasher's state is
/// about 400 bytes, and setting it up and moving it cost a small entry's read more than hashing.
const ONE_SHOT: usize = 256;

/// The checksum of a small entry without [`FLAG_BLOCKS`], in one call: the same XXH3-64, of the
/// same bytes, as [`Running`] computes. `None` for any other entry.
fn one_shot(header: &[u8], payload: &[u8], blocks: bool) -> Option<u64> {
    let len = CHECKSUM_AT + payload.len();
    if blocks || len > ONE_SHOT {
        return None;
    }
    let mut joined = [0u8; ONE_SHOT];
    joined[..CHECKSUM_AT].copy_from_slice(&header[..CHECKSUM_AT]);
    joined[CHECKSUM_AT..len].copy_from_slice(payload);
    Some(xxh3_64(&joined[..len]))
}

/// An entry's checksum being computed, the one definition that writers and readers share: XXH3-64
/// of the header's bytes before the checksum, then the payload, or with [`FLAG_BLOCKS`] each
/// block's XXH3-64.
struct Running {
    hasher: Xxh3Default,
    /// With [`FLAG_BLOCKS`]: the checksum of the block being fed, and how many of its bytes were
    /// (boxed: the small entries read most often do not carry a second hasher's state around).
    block: Option<Box<(Xxh3Default, usize)>>,
}

impl Running {
    fn new(header: &[u8], blocks: bool) -> Running {
        let mut hasher = Xxh3Default::new();
        hasher.update(&header[..CHECKSUM_AT]);
        Running {
            hasher,
            block: blocks.then(|| Box::new((Xxh3Default::new(), 0))),
        }
    }

    /// Feeds the next bytes of the payload.
    fn update(&mut self, mut bytes: &[u8]) {
        let Some(block) = &mut self.block else {
            self.hasher.update(bytes);
            return;
        };
        let (block, in_block) = &mut **block;
        while !bytes.is_empty() {
            let take = (CHECKSUM_BLOCK - *in_block).min(bytes.len());
            block.update(&bytes[..take]);
            *in_block += take;
            bytes = &bytes[take..];
            if *in_block == CHECKSUM_BLOCK {
                self.hasher.update(&block.digest().to_le_bytes());
                block.reset();
                *in_block = 0;
            }
        }
    }

    /// Feeds the rest of the payload, all of it; by blocks from the start of one, their
    /// checksums computed on the rayon pool.
    fn update_rest(&mut self, rest: &[u8]) {
        if self.block_sums_from_here() && rest.len() > CHECKSUM_BLOCK {
            self.add_block_sums(block_sums(rest));
        } else {
            self.update(rest);
        }
    }

    /// Whether the next bytes start a block (of an entry with [`FLAG_BLOCKS`]).
    fn block_sums_from_here(&self) -> bool {
        self.block.as_ref().is_some_and(|block| block.1 == 0)
    }

    /// Feeds the checksums of the blocks of the rest of the payload.
    fn add_block_sums(&mut self, sums: impl IntoIterator<Item = u64>) {
        for sum in sums {
            self.hasher.update(&sum.to_le_bytes());
        }
    }

    /// The checksum of what was fed (a last, shorter block included).
    fn digest(mut self) -> u64 {
        if let Some(block) = &self.block {
            if block.1 > 0 {
                self.hasher.update(&block.0.digest().to_le_bytes());
            }
        }
        self.hasher.digest()
    }
}

/// The XXH3-64 of each [`CHECKSUM_BLOCK`] bytes of `payload`, in order, computed on the rayon
/// pool.
fn block_sums(payload: &[u8]) -> Vec<u64> {
    use rayon::prelude::*;
    payload.par_chunks(CHECKSUM_BLOCK).map(xxh3_64).collect()
}

/// Builds the header for an uncompressed `payload`; the entry on disk is the header followed by
/// the payload.
pub fn encode_header(
    key: &CacheKey,
    created: SystemTime,
    duration: Duration,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    encode_header_with_flags(key, created, duration, 0, payload)
}

/// Builds the header for `payload` stored with `flags` (e.g. [`FLAG_ZSTD`]); [`FLAG_BLOCKS`] is
/// added from [`BLOCKS_FROM`] bytes of payload.
pub fn encode_header_with_flags(
    key: &CacheKey,
    created: SystemTime,
    duration: Duration,
    flags: u16,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    let flags = if payload.len() >= BLOCKS_FROM {
        flags | FLAG_BLOCKS
    } else {
        flags
    };
    header_as_flagged(key, created, duration, flags, payload)
}

/// The header with exactly `flags` (its checksum made the way they say).
fn header_as_flagged(
    key: &CacheKey,
    created: SystemTime,
    duration: Duration,
    flags: u16,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&flags.to_le_bytes());
    header[8..40].copy_from_slice(key.as_bytes());
    header[40..48].copy_from_slice(&unix_nanos(created).to_le_bytes());
    let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    header[48..56].copy_from_slice(&nanos.to_le_bytes());
    header[56..64].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let sum = checksum(&header, payload, flags & FLAG_BLOCKS != 0);
    header[64..72].copy_from_slice(&sum.to_le_bytes());
    header
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Reads and verifies just the header, without the payload (no checksum check).
pub fn decode_header(bytes: &[u8]) -> Result<EntryHeader, CorruptEntry> {
    if bytes.len() < HEADER_LEN {
        return Err(CorruptEntry::TooShort { len: bytes.len() });
    }
    if bytes[0..4] != MAGIC {
        return Err(CorruptEntry::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FORMAT_VERSION {
        return Err(CorruptEntry::OtherVersion { found: version });
    }
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(CorruptEntry::UnknownFlags { flags });
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[8..40]);
    Ok(EntryHeader {
        key: CacheKey::from_bytes(key),
        created: UNIX_EPOCH + Duration::from_nanos(u64_at(bytes, 40)),
        duration: Duration::from_nanos(u64_at(bytes, 48)),
        payload_len: u64_at(bytes, 56),
        compressed: flags & FLAG_ZSTD != 0,
        numbers: flags & FLAG_NUMBERS != 0,
        blocks: flags & FLAG_BLOCKS != 0,
    })
}

/// The MessagePack bytes of a payload: decompressed when the header says it is compressed. The
/// size recorded in the zstd frame is required and reserved fallibly, so a damaged frame cannot
/// cause an unbounded allocation.
pub fn plain_payload<'a>(
    header: &EntryHeader,
    payload: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, CorruptEntry> {
    if !header.compressed {
        return Ok(std::borrow::Cow::Borrowed(payload));
    }
    let size = zstd::zstd_safe::get_frame_content_size(payload)
        .ok()
        .flatten()
        .ok_or_else(|| CorruptEntry::Decompress("no content size in the zstd frame".into()))?;
    let size = usize::try_from(size)
        .map_err(|_| CorruptEntry::Decompress("content size too large".into()))?;
    let mut plain: Vec<u8> = Vec::new();
    plain
        .try_reserve_exact(size)
        .map_err(|_| CorruptEntry::Decompress(format!("cannot allocate {size} bytes")))?;
    let mut decompressor =
        zstd::bulk::Decompressor::new().map_err(|e| CorruptEntry::Decompress(e.to_string()))?;
    decompressor
        .decompress_to_buffer(payload, &mut plain)
        .map_err(|e| CorruptEntry::Decompress(e.to_string()))?;
    if plain.len() != size {
        return Err(CorruptEntry::Decompress("decompressed size differs".into()));
    }
    Ok(std::borrow::Cow::Owned(plain))
}

/// Compresses MessagePack bytes for [`FLAG_ZSTD`] at zstd `level`.
pub fn compress(plain: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(plain, level)
}

/// Verifies a whole entry read from storage and returns its header and payload.
pub fn decode<'a>(
    bytes: &'a [u8],
    expected: &CacheKey,
) -> Result<(EntryHeader, &'a [u8]), CorruptEntry> {
    let (header, payload, mut checksum) = decode_deferred(bytes, expected)?;
    checksum.update_rest(payload);
    checksum.verify()?;
    Ok((header, payload))
}

/// The checksum of an entry still to be verified: the payload is fed to it in order, in pieces
/// of any size, while it is read for decoding, then [`PendingChecksum::verify`] says whether the
/// entry is intact. A value decoded from the payload must not be used before that.
pub struct PendingChecksum {
    sum: Sum,
    expected: u64,
    fed: u64,
    payload_len: u64,
}

/// Where a [`PendingChecksum`] stands.
enum Sum {
    /// Nothing fed yet: the header's bytes before the checksum, and its [`FLAG_BLOCKS`].
    Start([u8; CHECKSUM_AT], bool),
    /// Fed in part or by pieces (boxed: a small entry's payload, fed whole, never needs it).
    Running(Box<Running>),
    /// The whole payload was fed at once: its checksum (see [`one_shot`]).
    Whole(u64),
}

impl PendingChecksum {
    /// The running checksum, set up on first use; `None` once the whole payload was fed at once
    /// (bytes fed after it make [`PendingChecksum::verify`] fail on their count).
    fn running(&mut self) -> Option<&mut Running> {
        if let Sum::Start(header, blocks) = &self.sum {
            self.sum = Sum::Running(Box::new(Running::new(header, *blocks)));
        }
        match &mut self.sum {
            Sum::Running(running) => Some(running),
            Sum::Start(..) | Sum::Whole(_) => None,
        }
    }

    /// Feeds the next bytes of the payload.
    pub fn update(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.fed += bytes.len() as u64;
        if let Some(running) = self.running() {
            running.update(bytes);
        }
    }

    /// Feeds the rest of the payload, all of it; with [`FLAG_BLOCKS`], from the start of a
    /// block, the blocks' checksums are computed on the rayon pool.
    pub fn update_rest(&mut self, rest: &[u8]) {
        if let Sum::Start(header, blocks) = &self.sum {
            if let Some(sum) = one_shot(header, rest, *blocks) {
                self.fed += rest.len() as u64;
                self.sum = Sum::Whole(sum);
                return;
            }
        }
        if rest.is_empty() {
            return;
        }
        self.fed += rest.len() as u64;
        if let Some(running) = self.running() {
            running.update_rest(rest);
        }
    }

    /// Whether the payload's next bytes start a block of an entry with [`FLAG_BLOCKS`], so that
    /// [`PendingChecksum::add_block_sums`] may be fed the checksums of the blocks from here.
    pub(crate) fn block_sums_from_here(&self) -> bool {
        match &self.sum {
            Sum::Start(_, blocks) => *blocks,
            Sum::Running(running) => running.block_sums_from_here(),
            Sum::Whole(_) => false,
        }
    }

    /// Feeds the checksums of the blocks of the rest of the payload, `len` bytes, computed by
    /// the caller (see [`PendingChecksum::block_sums_from_here`]). Nothing may be fed after.
    pub(crate) fn add_block_sums(&mut self, sums: impl IntoIterator<Item = u64>, len: usize) {
        self.fed += len as u64;
        if let Some(running) = self.running() {
            running.add_block_sums(sums);
        }
    }

    /// Whether the bytes fed were the whole payload the entry was written with.
    pub fn verify(self) -> Result<(), CorruptEntry> {
        let sum = match self.sum {
            Sum::Start(header, blocks) => checksum(&header, &[], blocks),
            Sum::Running(running) => running.digest(),
            Sum::Whole(sum) => sum,
        };
        if self.fed == self.payload_len && sum == self.expected {
            Ok(())
        } else {
            Err(CorruptEntry::ChecksumMismatch)
        }
    }
}

/// Checks a whole entry read from storage except its checksum, and returns its header, its
/// payload and the checksum to verify by feeding it the payload (see [`PendingChecksum`]): one
/// pass over a large payload can then both decode and verify it.
pub fn decode_deferred<'a>(
    bytes: &'a [u8],
    expected: &CacheKey,
) -> Result<(EntryHeader, &'a [u8], PendingChecksum), CorruptEntry> {
    let header = decode_header(bytes)?;
    if header.key != *expected {
        return Err(CorruptEntry::KeyMismatch);
    }
    let payload = &bytes[HEADER_LEN..];
    if header.payload_len != payload.len() as u64 {
        return Err(CorruptEntry::LengthMismatch {
            claimed: header.payload_len,
            present: payload.len() as u64,
        });
    }
    let mut start = [0u8; CHECKSUM_AT];
    start.copy_from_slice(&bytes[..CHECKSUM_AT]);
    let checksum = PendingChecksum {
        sum: Sum::Start(start, header.blocks),
        expected: u64_at(bytes, CHECKSUM_AT),
        fed: 0,
        payload_len: header.payload_len,
    };
    Ok((header, payload, checksum))
}

/// The header an entry of `payload` had before [`FLAG_BLOCKS`]: its checksum over the payload
/// whatever its size (such entries are still read).
#[cfg(test)]
pub(crate) fn header_without_blocks(
    key: &CacheKey,
    flags: u16,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    header_as_flagged(
        key,
        SystemTime::now(),
        Duration::ZERO,
        flags & !FLAG_BLOCKS,
        payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (CacheKey, Vec<u8>) {
        let key = CacheKey::from_bytes([7; 32]);
        let created = UNIX_EPOCH + Duration::from_nanos(0x0102_0304_0506_0708);
        let payload = b"payload".to_vec();
        let header = encode_header(&key, created, Duration::from_nanos(500), &payload);
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&payload);
        (key, bytes)
    }

    /// Small entries' checksums are computed in one call (on the header's bytes and the payload
    /// joined): the same checksum as the definition's, however the payload is fed to a reader,
    /// and no entry with a byte too few, too many or changed verifies.
    #[test]
    fn small_entries_checksum_in_one_call_as_defined() {
        let key = CacheKey::from_bytes([3; 32]);
        for len in 0..=ONE_SHOT {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let header = encode_header(&key, UNIX_EPOCH, Duration::from_nanos(9), &payload);
            let mut spelled = header[..CHECKSUM_AT].to_vec();
            spelled.extend_from_slice(&payload);
            assert_eq!(
                u64_at(&header, CHECKSUM_AT),
                xxh3_64(&spelled),
                "{len} bytes"
            );
            let mut bytes = header.to_vec();
            bytes.extend_from_slice(&payload);
            assert_eq!(decode(&bytes, &key).unwrap().1, &payload[..], "{len} bytes");
            for first in [0, 1, len / 2, len]
                .into_iter()
                .filter(|&first| first <= len)
            {
                let (_, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
                checksum.update(&payload[..first]);
                checksum.update_rest(&payload[first..]);
                assert_eq!(checksum.verify(), Ok(()), "{len} bytes, {first} first");
            }
            let (_, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
            checksum.update_rest(payload);
            checksum.update(b"x");
            assert_eq!(checksum.verify(), Err(CorruptEntry::ChecksumMismatch));
            if len > 0 {
                let (_, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
                checksum.update_rest(&payload[1..]);
                assert_eq!(checksum.verify(), Err(CorruptEntry::ChecksumMismatch));
            }
            assert_every_byte_flip_is_detected(&bytes, &key, 0x20);
        }
    }

    /// Flips `bits` in each byte of the entry `bytes` in turn: none of them decodes.
    fn assert_every_byte_flip_is_detected(bytes: &[u8], key: &CacheKey, bits: u8) {
        for at in 0..bytes.len() {
            let mut damaged = bytes.to_vec();
            damaged[at] ^= bits;
            assert!(
                decode(&damaged, key).is_err(),
                "{} bytes, flip at {at} went unnoticed",
                bytes.len()
            );
        }
    }

    #[test]
    fn header_bytes_are_pinned() {
        let (_, bytes) = sample();
        assert_eq!(&bytes[0..8], b"MEMO\x01\x00\x00\x00");
        assert_eq!(&bytes[8..40], &[7u8; 32]);
        assert_eq!(&bytes[40..48], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[48..56], &500u64.to_le_bytes());
        assert_eq!(&bytes[56..64], &7u64.to_le_bytes());
        assert_eq!(&bytes[72..], b"payload");
        assert_eq!(bytes.len(), HEADER_LEN + 7);
    }

    #[test]
    fn round_trip() {
        let (key, bytes) = sample();
        let (header, payload) = decode(&bytes, &key).unwrap();
        assert_eq!(payload, b"payload");
        assert_eq!(header.duration, Duration::from_nanos(500));
        assert_eq!(header.payload_len, 7);
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let (key, bytes) = sample();
        assert_every_byte_flip_is_detected(&bytes, &key, 0x40);
    }

    #[test]
    fn truncation_padding_and_wrong_key_are_rejected() {
        let (key, bytes) = sample();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len], &key).is_err(), "truncated to {len}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            decode(&padded, &key),
            Err(CorruptEntry::LengthMismatch { .. })
        ));
        let other = CacheKey::from_bytes([8; 32]);
        assert_eq!(decode(&bytes, &other), Err(CorruptEntry::KeyMismatch));
    }

    #[test]
    fn a_huge_claimed_length_is_rejected_without_allocating() {
        let (key, mut bytes) = sample();
        bytes[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bytes, &key),
            Err(CorruptEntry::LengthMismatch { .. })
        ));
    }

    #[test]
    fn other_versions_are_never_read() {
        let (key, mut bytes) = sample();
        bytes[4] = 2;
        assert_eq!(
            decode(&bytes, &key),
            Err(CorruptEntry::OtherVersion { found: 2 })
        );
    }

    /// A payload of `len` bytes that differ from block to block.
    fn large_payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 / 7 % 251) as u8).collect()
    }

    #[test]
    fn large_payloads_are_checksummed_by_blocks_as_the_format_says() {
        let key = CacheKey::from_bytes([5; 32]);
        let payload = large_payload(2 * CHECKSUM_BLOCK + 12_345);
        let header =
            encode_header_with_flags(&key, UNIX_EPOCH, Duration::ZERO, FLAG_ZSTD, &payload);
        assert_eq!(
            u16::from_le_bytes([header[6], header[7]]),
            FLAG_ZSTD | FLAG_BLOCKS
        );
        // The definition, spelled out: header bytes 0..64, then each block's XXH3-64.
        let mut spelled = header[..64].to_vec();
        for block in payload.chunks(CHECKSUM_BLOCK) {
            spelled.extend_from_slice(&xxh3_64(block).to_le_bytes());
        }
        assert_eq!(u64_at(&header, CHECKSUM_AT), xxh3_64(&spelled));
        // Below the size, no blocks.
        let small = encode_header(
            &key,
            UNIX_EPOCH,
            Duration::ZERO,
            &payload[..BLOCKS_FROM - 1],
        );
        assert_eq!(u16::from_le_bytes([small[6], small[7]]), 0);

        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&payload);
        assert_eq!(decode(&bytes, &key).unwrap().1, &payload[..]);
        // Fed in pieces that straddle the blocks, or the rest at once after some: the same.
        for piece in [1usize, 777, CHECKSUM_BLOCK - 1, CHECKSUM_BLOCK + 3] {
            let (_, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
            for part in payload.chunks(piece) {
                checksum.update(part);
            }
            assert_eq!(checksum.verify(), Ok(()), "pieces of {piece}");
        }
        let (_, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
        checksum.update(&payload[..CHECKSUM_BLOCK]);
        checksum.update_rest(&payload[CHECKSUM_BLOCK..]);
        assert_eq!(checksum.verify(), Ok(()));
        // Not all of it, or more: never verified.
        let (_, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
        checksum.update_rest(&payload[..payload.len() - 1]);
        assert_eq!(checksum.verify(), Err(CorruptEntry::ChecksumMismatch));

        // A byte changed in any block, or in the header: a mismatch.
        for at in [
            HEADER_LEN + 5,
            HEADER_LEN + CHECKSUM_BLOCK + 9,
            bytes.len() - 1,
            50,
        ] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert_eq!(
                decode(&damaged, &key),
                Err(CorruptEntry::ChecksumMismatch),
                "byte {at}"
            );
        }
    }

    #[test]
    fn large_entries_written_before_blocks_are_still_read() {
        let key = CacheKey::from_bytes([6; 32]);
        let payload = large_payload(BLOCKS_FROM + 100);
        let mut bytes = header_without_blocks(&key, FLAG_NUMBERS, &payload).to_vec();
        assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), FLAG_NUMBERS);
        bytes.extend_from_slice(&payload);
        let (header, read) = decode(&bytes, &key).unwrap();
        assert!(!header.blocks && header.numbers);
        assert_eq!(read, &payload[..]);
        // The same bytes under the flag are another checksum: never read as intact.
        bytes[6] |= FLAG_BLOCKS as u8;
        assert_eq!(decode(&bytes, &key), Err(CorruptEntry::ChecksumMismatch));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn entry(key: [u8; 32], payload: &[u8], nanos: u64) -> Vec<u8> {
            let key = CacheKey::from_bytes(key);
            let created = UNIX_EPOCH + Duration::from_nanos(nanos);
            let mut bytes =
                encode_header(&key, created, Duration::from_nanos(nanos / 3), payload).to_vec();
            bytes.extend_from_slice(payload);
            bytes
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

            /// Arbitrary bytes never panic the decoder, and never decode for a key they do not name.
            #[test]
            fn arbitrary_bytes_are_rejected_without_panicking(
                bytes in proptest::collection::vec(any::<u8>(), 0..600),
                key in any::<[u8; 32]>(),
            ) {
                let key = CacheKey::from_bytes(key);
                if let Ok((header, payload)) = decode(&bytes, &key) {
                    prop_assert_eq!(header.key, key);
                    prop_assert_eq!(payload.len() as u64, header.payload_len);
                }
                let _ = decode_header(&bytes);
            }

            /// A valid entry with one byte changed, cut short or lengthened is rejected: the
            /// decoder returns the original payload or an error, never other bytes.
            #[test]
            fn damaged_entries_are_rejected(
                key in any::<[u8; 32]>(),
                payload in proptest::collection::vec(any::<u8>(), 0..2_000),
                nanos in any::<u64>(),
                at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
                damage in 0u8..3,
            ) {
                let original = entry(key, &payload, nanos);
                let mut bytes = original.clone();
                let at = at.index(bytes.len());
                match damage {
                    0 => bytes[at] ^= flip,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, flip),
                }
                let key = CacheKey::from_bytes(key);
                if let Ok((_, decoded)) = decode(&bytes, &key) {
                    prop_assert!(bytes == original && decoded == &payload[..]);
                }
                prop_assert!(decode(&original, &key).is_ok());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

            /// A payload checksummed by blocks verifies however it is fed (pieces of any sizes,
            /// the rest at once), and not with one byte changed anywhere.
            #[test]
            fn blocks_verify_however_fed_and_never_when_damaged(
                extra in 0usize..(CHECKSUM_BLOCK + 3),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
                rest_from in any::<prop::sample::Index>(),
                at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let key = CacheKey::from_bytes([9; 32]);
                let payload = large_payload(BLOCKS_FROM + extra - 2);
                let mut bytes =
                    encode_header(&key, UNIX_EPOCH, Duration::ZERO, &payload).to_vec();
                bytes.extend_from_slice(&payload);
                let (header, payload, mut checksum) = decode_deferred(&bytes, &key).unwrap();
                prop_assert!(header.blocks);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(payload.len())).collect();
                cuts.sort_unstable();
                let rest_from = rest_from.index(payload.len());
                let mut fed = 0;
                for cut in cuts.into_iter().filter(|&cut| cut <= rest_from) {
                    checksum.update(&payload[fed..cut]);
                    fed = cut;
                }
                checksum.update(&payload[fed..rest_from]);
                checksum.update_rest(&payload[rest_from..]);
                prop_assert_eq!(checksum.verify(), Ok(()));

                let at = at.index(bytes.len());
                bytes[at] ^= flip;
                prop_assert!(decode(&bytes, &key).is_err(), "byte {} changed", at);
            }
        }
    }
}
