//! How a stored value becomes an entry's payload and back: MessagePack (rmp-serde) for every
//! type, or raw little-endian bytes for a `Vec` of primitive numbers, which decodes with one copy
//! instead of one call per element (for a large one, on the rayon pool and in the pass that verifies
//! the entry's checksum).
//!
//! Generated code picks the codec from the function's return type by method resolution
//! ([`CodecFor`]): [`NumbersCodec`] where it applies, [`SerdeCodec`] otherwise.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use crate::array::Array;
use crate::entry::{PendingChecksum, CHECKSUM_BLOCK, FLAG_NUMBERS};
use crate::function::CacheValue;
use crate::key::Number;

/// Decodes the payload at a range of a mapped entry file in place.
type DecodeMapped<T> = fn(Arc<memmap2::Mmap>, Range<usize>) -> Result<T, String>;

/// Decodes a payload while feeding all of it, in order, to the entry's checksum.
type DecodeChecked<T> = fn(&[u8], &mut PendingChecksum) -> Result<T, String>;

/// Encoding and decoding of one stored type. Plain function pointers: `Copy`, `Send`, `Sync`.
pub struct Codec<T> {
    encode: fn(&T) -> Result<Vec<u8>, String>,
    decode: fn(&[u8]) -> Result<T, String>,
    /// Decodes a payload that is a range of a mapped entry file without copying it, for the
    /// types that can ([`Array`]).
    decode_mapped: Option<DecodeMapped<T>>,
    /// Decodes a large payload and feeds it to the entry's checksum in the same pass, for the
    /// types whose decoding is a copy ([`Codec::numbers`]).
    decode_checked: Option<DecodeChecked<T>>,
    /// The header flags of its payloads ([`FLAG_NUMBERS`] or none).
    flags: u16,
}

impl<T> Clone for Codec<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Codec<T> {}

impl<T> std::fmt::Debug for Codec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.flags & FLAG_NUMBERS != 0 {
            "numbers"
        } else {
            "MessagePack"
        };
        write!(f, "Codec({name})")
    }
}

impl<T> Codec<T> {
    /// The payload of `value`, or why it cannot be encoded.
    pub fn encode(&self, value: &T) -> Result<Vec<u8>, String> {
        (self.encode)(value)
    }

    /// The value a payload holds, or why it does not decode.
    pub fn decode(&self, payload: &[u8]) -> Result<T, String> {
        (self.decode)(payload)
    }

    /// The header flags of its payloads.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The value a payload at `bytes` of a mapped entry holds, without copying it; `None` when
    /// this codec copies anyway (then [`Codec::decode`] the bytes).
    pub(crate) fn decode_mapped(
        &self,
        map: Arc<memmap2::Mmap>,
        bytes: Range<usize>,
    ) -> Option<Result<T, String>> {
        self.decode_mapped.map(|decode| decode(map, bytes))
    }

    /// The value a payload holds, reading each byte once for decoding and for `checksum`,
    /// which has then been fed the whole payload whatever the outcome; `None` when this codec
    /// does not do both in one pass. The value must not be used unless the checksum verifies.
    pub(crate) fn decode_checked(
        &self,
        payload: &[u8],
        checksum: &mut PendingChecksum,
    ) -> Option<Result<T, String>> {
        self.decode_checked.map(|decode| decode(payload, checksum))
    }
}

impl<T: CacheValue> Codec<T> {
    /// MessagePack with named struct fields (`rmp_serde::to_vec_named`).
    pub fn message_pack() -> Self {
        Codec {
            encode: |value| rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
            decode: |bytes| rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
            decode_mapped: None,
            decode_checked: None,
            flags: 0,
        }
    }
}

/// Bytes before the elements in a numbers payload: the element's tag, then zeros (so that the
/// elements start 8-byte aligned within the payload).
const PREFIX: usize = 8;

impl<N: Number> Codec<Vec<N>> {
    /// Raw little-endian elements after an 8-byte prefix (the element's key tag, then zeros).
    pub fn numbers() -> Self {
        Codec {
            encode: |values| encode_numbers::<N>(values),
            decode: decode_numbers::<N>,
            decode_mapped: None,
            decode_checked: Some(decode_numbers_checked::<N>),
            flags: FLAG_NUMBERS,
        }
    }
}

impl<N: Number> Codec<Array<N>> {
    /// The payload format of [`Codec::numbers`]; a hit on a mapped entry reads the mapping.
    pub fn array() -> Self {
        Codec {
            encode: |values| encode_numbers::<N>(values),
            decode: |payload| decode_numbers::<N>(payload).map(Array::from),
            decode_mapped: Some(|map, bytes| {
                let payload = map.get(bytes.clone()).ok_or("payload outside the entry")?;
                if cfg!(target_endian = "big") {
                    // The bytes need swapping: the copying way.
                    return decode_numbers::<N>(payload).map(Array::from);
                }
                let start = bytes.start + PREFIX;
                let elements = start..start + elements_of::<N>(payload)?.len();
                Array::mapped(map, elements).ok_or_else(|| {
                    format!(
                        "the payload's elements are not aligned for `{}`",
                        std::any::type_name::<N>()
                    )
                })
            }),
            decode_checked: None,
            flags: FLAG_NUMBERS,
        }
    }
}

fn encode_numbers<N: Number>(values: &[N]) -> Result<Vec<u8>, String> {
    let size = std::mem::size_of_val(values);
    let mut payload = Vec::new();
    payload
        .try_reserve_exact(PREFIX + size)
        .map_err(|_| format!("cannot allocate {size} bytes to store the value"))?;
    payload.push(N::TAG);
    payload.resize(PREFIX, 0);
    if cfg!(target_endian = "little") {
        payload.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for value in values {
            value.write_le(&mut payload);
        }
    }
    Ok(payload)
}

/// The element bytes of a numbers payload, checked: the prefix names `N`, and they are a whole
/// number of `N`.
fn elements_of<N: Number>(payload: &[u8]) -> Result<&[u8], String> {
    let size = std::mem::size_of::<N>();
    let (prefix, elements) = payload
        .split_at_checked(PREFIX)
        .ok_or("a numbers payload shorter than its prefix")?;
    if prefix[0] != N::TAG || prefix[1..].iter().any(|&b| b != 0) {
        return Err(format!(
            "a numbers payload of another element type than `{}`",
            std::any::type_name::<N>()
        ));
    }
    if elements.len() % size != 0 {
        return Err(format!(
            "{} bytes of elements is not a whole number of `{}`",
            elements.len(),
            std::any::type_name::<N>()
        ));
    }
    Ok(elements)
}

fn decode_numbers<N: Number>(payload: &[u8]) -> Result<Vec<N>, String> {
    let elements = elements_of::<N>(payload)?;
    let mut values = numbers_for::<N>(elements)?;
    // Filled straight from the bytes (no zeroing first): a copy the compiler vectorizes.
    values.extend(
        elements
            .chunks_exact(std::mem::size_of::<N>())
            .map(bytemuck::pod_read_unaligned::<N>),
    );
    if cfg!(target_endian = "big") {
        N::from_le_in_place(&mut values);
    }
    Ok(values)
}

/// Bytes copied at a time by [`write_numbers_checked`] before the checksum reads them again,
/// still in the core's cache.
const CHECKED_BLOCK: usize = 256 << 10;

/// The share of the elements, in tenths, that [`write_numbers_checked`] copies on the calling
/// thread (which also computes the checksum); another thread of the rayon pool copies the rest.
const CHECKED_FRONT_TENTHS: usize = 3;

/// [`decode_numbers`] in the pass that feeds the payload to the checksum, on the rayon pool:
/// the copying, the kernel's zeroing of the fresh pages it writes to (a third of the time of a
/// hit) and, for an entry with [`crate::entry::FLAG_BLOCKS`], the checksum run on every core
/// ([`write_numbers_in_blocks`]); for an entry without, the sequential checksum runs on the
/// calling thread beside a copy on another ([`write_numbers_checked`]).
fn decode_numbers_checked<N: Number>(
    payload: &[u8],
    checksum: &mut PendingChecksum,
) -> Result<Vec<N>, String> {
    let decoded = elements_of::<N>(payload).and_then(|elements| {
        let values = numbers_for::<N>(elements)?;
        Ok((elements, values))
    });
    let (elements, mut values) = match decoded {
        Ok(decoded) => decoded,
        Err(message) => {
            checksum.update(payload);
            return Err(message);
        }
    };
    let size = std::mem::size_of::<N>();
    let count = elements.len() / size;
    let written = if checksum.block_sums_from_here() {
        write_numbers_in_blocks(payload, &mut values.spare_capacity_mut()[..count], checksum)
    } else {
        write_numbers_checked(payload, &mut values.spare_capacity_mut()[..count], checksum)
    };
    if written != count {
        return Err("the elements were not all copied".to_owned());
    }
    // SAFETY: the first `count` elements of the capacity (reserved by `numbers_for`) were all
    // written just above.
    unsafe { values.set_len(count) };
    if cfg!(target_endian = "big") {
        N::from_le_in_place(&mut values);
    }
    Ok(values)
}

/// Writes the elements of a numbers `payload` to `values` and feeds the payload to `checksum`
/// (of an entry without [`crate::entry::FLAG_BLOCKS`]); returns how many it wrote, from the
/// start. The checksum (XXH3, sequential) reads the front part block by block just after the
/// calling thread copied it, from the core's cache, then the back part, which another thread
/// of the rayon pool copies meanwhile.
fn write_numbers_checked<N: Number>(
    payload: &[u8],
    values: &mut [std::mem::MaybeUninit<N>],
    checksum: &mut PendingChecksum,
) -> usize {
    checksum.update(&payload[..PREFIX]);
    let elements = &payload[PREFIX..];
    let size = std::mem::size_of::<N>();
    let count = values.len();
    let front = count / 10 * CHECKED_FRONT_TENTHS;
    let (front_bytes, back_bytes) = elements.split_at((front * size).min(elements.len()));
    let (front_values, back_values) = values.split_at_mut(front);
    let (front_written, back_written) = rayon::join(
        || {
            let mut written = 0;
            for (values, block) in front_values
                .chunks_mut(CHECKED_BLOCK / size)
                .zip(front_bytes.chunks(CHECKED_BLOCK))
            {
                written += write_numbers(values, block);
                checksum.update(block);
            }
            checksum.update(back_bytes);
            written
        },
        || write_numbers(back_values, back_bytes),
    );
    // The back part was written only if the front part was whole.
    if front_written == front {
        front_written + back_written
    } else {
        front_written
    }
}

/// Writes the elements of a numbers `payload` to `values` and feeds `checksum` (of an entry
/// with [`crate::entry::FLAG_BLOCKS`], from the payload's start) the checksum of each block:
/// the blocks are copied and checksummed on the rayon pool, each block read again from the
/// core's cache. Returns how many elements it wrote, from the start.
fn write_numbers_in_blocks<N: Number>(
    payload: &[u8],
    values: &mut [std::mem::MaybeUninit<N>],
    checksum: &mut PendingChecksum,
) -> usize {
    use rayon::prelude::*;
    let size = std::mem::size_of::<N>();
    // The first block holds the prefix, then its elements; the others, elements only.
    let first = ((CHECKSUM_BLOCK - PREFIX) / size).min(values.len());
    let (head, tail) = values.split_at_mut(first);
    let mut targets = vec![head];
    targets.extend(tail.chunks_mut(CHECKSUM_BLOCK / size));
    let blocks: Vec<(usize, usize, u64)> = payload
        .par_chunks(CHECKSUM_BLOCK)
        .zip(targets)
        .enumerate()
        .map(|(i, (block, target))| {
            let elements = if i == 0 { &block[PREFIX..] } else { block };
            let written = write_numbers(target, elements);
            (written, block.len(), xxhash_rust::xxh3::xxh3_64(block))
        })
        .collect();
    let fed = blocks.iter().map(|block| block.1).sum();
    checksum.add_block_sums(blocks.iter().map(|block| block.2), fed);
    // Whole blocks from the start: a short one would leave a gap after it.
    let mut written = 0;
    for (i, block) in blocks.iter().enumerate() {
        written += block.0;
        let whole = if i == 0 { first } else { CHECKSUM_BLOCK / size };
        if block.0 != whole {
            break;
        }
    }
    written
}

/// Writes the little-endian numbers in `elements` as they are (no swapping) to the start of
/// `values`; returns how many it wrote.
fn write_numbers<N: Number>(values: &mut [std::mem::MaybeUninit<N>], elements: &[u8]) -> usize {
    let mut written = 0;
    for (value, bytes) in values
        .iter_mut()
        .zip(elements.chunks_exact(std::mem::size_of::<N>()))
    {
        value.write(bytemuck::pod_read_unaligned::<N>(bytes));
        written += 1;
    }
    written
}

/// An empty `Vec` with room for the numbers in `elements`.
fn numbers_for<N: Number>(elements: &[u8]) -> Result<Vec<N>, String> {
    let mut values: Vec<N> = Vec::new();
    values
        .try_reserve_exact(elements.len() / std::mem::size_of::<N>())
        .map_err(|_| format!("cannot allocate {} bytes for the value", elements.len()))?;
    advise_huge_pages(values.spare_capacity_mut());
    Ok(values)
}

/// Asks Linux to back a large fresh allocation with transparent huge pages where the system
/// allows it on request (`madvise` mode): filling 100 MB then takes 50 page faults, not 25,000.
/// Only advice: nothing changes if it is refused.
fn advise_huge_pages<T>(spare: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(spare);
        if bytes < 4 * HUGE {
            return;
        }
        let start = spare.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > aligned {
            // SAFETY: the range lies within an allocation this function holds exclusively, and
            // MADV_HUGEPAGE only changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = spare;
}

/// The codec chooser generated code calls `.codec()` on (through a reference, see
/// [`NumbersCodec`] and [`SerdeCodec`]).
pub struct CodecFor<T>(PhantomData<fn() -> T>);

impl<T> CodecFor<T> {
    /// The chooser for `T`.
    pub const NEW: Self = CodecFor(PhantomData);
}

impl<T> std::fmt::Debug for CodecFor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CodecFor")
    }
}

/// Picked first, for a `Vec` of primitive numbers: [`Codec::numbers`].
pub trait NumbersCodec<T> {
    /// The codec for `T`.
    fn codec(&self) -> Codec<T>;
}

impl<N: Number> NumbersCodec<Vec<N>> for CodecFor<Vec<N>> {
    fn codec(&self) -> Codec<Vec<N>> {
        Codec::numbers()
    }
}

impl<N: Number> NumbersCodec<Array<N>> for CodecFor<Array<N>> {
    fn codec(&self) -> Codec<Array<N>> {
        Codec::array()
    }
}

/// Picked for every other type: [`Codec::message_pack`]. (The bound is on the method, so that a
/// type that cannot be stored is reported as such rather than as a missing method.)
pub trait SerdeCodec<T> {
    /// The codec for `T`.
    fn codec(&self) -> Codec<T>
    where
        T: CacheValue;
}

impl<T> SerdeCodec<T> for &CodecFor<T> {
    fn codec(&self) -> Codec<T>
    where
        T: CacheValue,
    {
        Codec::message_pack()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_refuse_other_payloads() {
        let codec = Codec::<Vec<f64>>::numbers();
        let values = vec![0.0, -0.0, 1.5, f64::MAX, f64::NAN];
        let payload = codec.encode(&values).unwrap();
        assert_eq!(payload.len(), 8 + 5 * 8);
        assert_eq!(&payload[8..16], &0.0f64.to_le_bytes());
        let back = codec.decode(&payload).unwrap();
        assert_eq!(back.len(), 5);
        assert!(back
            .iter()
            .zip(&values)
            .all(|(a, b)| a.to_bits() == b.to_bits()));

        assert!(codec.decode(&payload[..12]).is_err());
        assert!(codec.decode(&payload[..3]).is_err());
        let as_u64 = Codec::<Vec<u64>>::numbers();
        assert!(as_u64.decode(&payload).is_err(), "another element type");
        assert!(codec.decode(&[]).is_err());
        assert_eq!(
            codec.decode(&codec.encode(&Vec::new()).unwrap()).unwrap(),
            Vec::<f64>::new()
        );
    }

    /// A whole entry of `values` as the numbers codec stores it, and its key; `blocks`: as
    /// memo writes it now (large ones with `FLAG_BLOCKS`), or as before that flag.
    fn numbers_entry(values: &[f64], blocks: bool) -> (crate::key::CacheKey, Vec<u8>) {
        let key = crate::key::CacheKey::from_bytes([3; 32]);
        let payload = Codec::<Vec<f64>>::numbers()
            .encode(&values.to_vec())
            .unwrap();
        let header = if blocks {
            crate::entry::encode_header_with_flags(
                &key,
                std::time::SystemTime::now(),
                std::time::Duration::ZERO,
                FLAG_NUMBERS,
                &payload,
            )
        } else {
            crate::entry::header_without_blocks(&key, FLAG_NUMBERS, &payload)
        };
        let mut entry = header.to_vec();
        entry.extend_from_slice(&payload);
        (key, entry)
    }

    /// Decodes an entry in the pass that verifies it: the value, or why not.
    fn decode_in_one_pass<N: Number>(
        codec: Codec<Vec<N>>,
        key: &crate::key::CacheKey,
        entry: &[u8],
    ) -> Result<Vec<N>, String> {
        let (_, payload, mut checksum) =
            crate::entry::decode_deferred(entry, key).map_err(|e| e.to_string())?;
        let decoded = codec.decode_checked(payload, &mut checksum).unwrap();
        checksum.verify().map_err(|e| e.to_string())?;
        decoded
    }

    #[test]
    fn numbers_decode_in_the_pass_that_verifies_them() {
        let codec = Codec::<Vec<f64>>::numbers();
        for blocks in [true, false] {
            // Several blocks (of the checksum, or copied on the calling thread), a count that
            // does not split evenly, and counts too small to split at all.
            for count in [300_007usize, 9, 1, 0] {
                let values: Vec<f64> = (0..count).map(|i| i as f64 * 0.5 - 7.0).collect();
                let (key, entry) = numbers_entry(&values, blocks);
                let flags = u16::from_le_bytes([entry[6], entry[7]]);
                assert_eq!(
                    flags & crate::entry::FLAG_BLOCKS != 0,
                    blocks && count > 1000
                );
                let back = decode_in_one_pass(codec, &key, &entry).unwrap();
                assert_eq!(back.len(), count);
                assert!(back
                    .iter()
                    .zip(&values)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }

            let values: Vec<f64> = (0..300_007).map(|i| i as f64).collect();
            let (key, entry) = numbers_entry(&values, blocks);
            let payload_at = crate::entry::HEADER_LEN;
            // A byte changed in the prefix, in the first block (or the part the calling thread
            // copies, the first 30 %), in the second block (or the part another thread copies),
            // and last: never a value.
            for at in [
                payload_at + 1,
                payload_at + 8 + 1000,
                payload_at + 8 + 8 * 250_000,
                entry.len() - 1,
            ] {
                let mut damaged = entry.clone();
                damaged[at] ^= 0x10;
                let message = decode_in_one_pass(codec, &key, &damaged).unwrap_err();
                assert_eq!(
                    message, "checksum mismatch (damaged entry)",
                    "byte {at}, {blocks}"
                );
            }
            // Intact, but of another element type: the decoding error, after a verified
            // checksum.
            let outcome = decode_in_one_pass(Codec::<Vec<u64>>::numbers(), &key, &entry);
            assert!(outcome.unwrap_err().contains("another element type"));
        }
    }

    #[test]
    // The `&` is what lets method resolution try `NumbersCodec` first.
    #[allow(clippy::needless_borrow)]
    fn the_chooser_picks_numbers_for_vecs_of_numbers_only() {
        assert_eq!((&CodecFor::<Vec<f32>>::NEW).codec().flags(), FLAG_NUMBERS);
        assert_eq!((&CodecFor::<Vec<u8>>::NEW).codec().flags(), FLAG_NUMBERS);
        assert_eq!((&CodecFor::<Vec<String>>::NEW).codec().flags(), 0);
        assert_eq!((&CodecFor::<u64>::NEW).codec().flags(), 0);
        assert_eq!((&CodecFor::<Vec<(u8, u8)>>::NEW).codec().flags(), 0);
    }
}
