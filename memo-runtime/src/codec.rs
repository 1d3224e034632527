//! How a stored value becomes an entry's payload and back: MessagePack (rmp-serde) for every
//! type, or raw little-endian bytes for a `Vec` of primitive numbers, which decodes with one copy
//! instead of one call per element.
//!
//! Generated code picks the codec from the function's return type by method resolution
//! ([`CodecFor`]): [`NumbersCodec`] where it applies, [`SerdeCodec`] otherwise.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use crate::array::Array;
use crate::entry::FLAG_NUMBERS;
use crate::function::CacheValue;
use crate::key::Number;

/// Decodes the payload at a range of a mapped entry file in place.
type DecodeMapped<T> = fn(Arc<memmap2::Mmap>, Range<usize>) -> Result<T, String>;

/// Encoding and decoding of one stored type. Plain function pointers: `Copy`, `Send`, `Sync`.
pub struct Codec<T> {
    encode: fn(&T) -> Result<Vec<u8>, String>,
    decode: fn(&[u8]) -> Result<T, String>,
    /// Decodes a payload that is a range of a mapped entry file without copying it, for the
    /// types that can ([`Array`]).
    decode_mapped: Option<DecodeMapped<T>>,
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
}

impl<T: CacheValue> Codec<T> {
    /// MessagePack with named struct fields (`rmp_serde::to_vec_named`).
    pub fn message_pack() -> Self {
        Codec {
            encode: |value| rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
            decode: |bytes| rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
            decode_mapped: None,
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
    let size = std::mem::size_of::<N>();
    let elements = elements_of::<N>(payload)?;
    let mut values: Vec<N> = Vec::new();
    values
        .try_reserve_exact(elements.len() / size)
        .map_err(|_| format!("cannot allocate {} bytes for the value", elements.len()))?;
    advise_huge_pages(values.spare_capacity_mut());
    // Filled straight from the bytes (no zeroing first): a copy the compiler vectorizes.
    values.extend(
        elements
            .chunks_exact(size)
            .map(bytemuck::pod_read_unaligned::<N>),
    );
    if cfg!(target_endian = "big") {
        N::from_le_in_place(&mut values);
    }
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
