//! Cache keys: the arguments' serde serialization, streamed into BLAKE3.
//!
//! The arguments are never serialized into one buffer: [`ArgsHasher`] is a serde
//! [`Serializer`](serde::Serializer) that writes a compact, self-delimiting encoding (a tag byte per value,
//! fixed-width little-endian numbers, length-prefixed strings) through a small buffer into a
//! [`blake3::Hasher`]. The encoding is prefix-free, so two different values of one type never
//! feed the hasher the same bytes.
//!
//! Rules worth knowing (they are the documented keying rules of memo):
//! - Floats are keyed by their bit pattern, so `-0.0` and `0.0` are different keys (they can give
//!   different results, `1.0 / x`), while every NaN is keyed as one canonical NaN.
//! - `std` and `hashbrown` `HashMap`/`HashSet` values are keyed independently of their iteration
//!   order (which is random per process): each entry is hashed on its own and the digests are
//!   sorted. They are recognised by type, directly or behind `&`, `Box`, `Rc` or `Arc`. Every other
//!   sequence or map (a `Vec`, a `BTreeMap`, an `IndexMap`) is keyed in its iteration order.
//! - Struct, variant and field names are part of the key.

use std::fmt;

use serde::ser::{self, Serialize};

/// The key of one cache entry: a 256-bit BLAKE3 digest of the function's identity, its version
/// and its arguments.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        CacheKey(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 lowercase hexadecimal digits, as used in entry file names.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why an argument could not be hashed: its `Serialize` implementation returned an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

impl ser::Error for KeyError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        KeyError(msg.to_string())
    }
}

/// Domain separation: a key of this format can never equal a digest made for another purpose.
const KEY_DOMAIN: &[u8] = b"memo cache key v2\0";

mod tag {
    pub const BOOL: u8 = 1;
    pub const I8: u8 = 2;
    pub const I16: u8 = 3;
    pub const I32: u8 = 4;
    pub const I64: u8 = 5;
    pub const I128: u8 = 6;
    pub const U8: u8 = 7;
    pub const U16: u8 = 8;
    pub const U32: u8 = 9;
    pub const U64: u8 = 10;
    pub const U128: u8 = 11;
    pub const F32: u8 = 12;
    pub const F64: u8 = 13;
    pub const CHAR: u8 = 14;
    pub const STR: u8 = 15;
    pub const BYTES: u8 = 16;
    pub const NONE: u8 = 17;
    pub const SOME: u8 = 18;
    pub const UNIT: u8 = 19;
    pub const UNIT_STRUCT: u8 = 20;
    pub const UNIT_VARIANT: u8 = 21;
    pub const NEWTYPE_STRUCT: u8 = 22;
    pub const NEWTYPE_VARIANT: u8 = 23;
    pub const SEQ: u8 = 24;
    pub const TUPLE: u8 = 25;
    pub const TUPLE_STRUCT: u8 = 26;
    pub const TUPLE_VARIANT: u8 = 27;
    pub const MAP: u8 = 28;
    pub const STRUCT: u8 = 29;
    pub const STRUCT_VARIANT: u8 = 30;
    pub const UNORDERED: u8 = 31;
    pub const END: u8 = 32;
    pub const ARG: u8 = 33;
    pub const NUMBERS: u8 = 34;
}

/// Bytes buffered before they are handed to BLAKE3: large enough for its SIMD paths.
const LARGE_BUFFER: usize = 64 * 1024;
const SMALL_BUFFER: usize = 256;
/// Slices at least this long are hashed by BLAKE3 on several threads.
const PARALLEL_FROM: usize = 1 << 20;

/// A buffered BLAKE3 writer: small keys never touch the heap (they are hashed in one call at the
/// end, without a `blake3::Hasher`, whose 1.9 KB state would cost more to build and move than a
/// small key costs to hash); large ones are hashed in 64 KiB blocks so that BLAKE3 can use its
/// wide SIMD paths.
//
// In this order, so that the small buffer's zeros are written apart from the fields that the
// first write reads (`len` first): zeroed together, they were one `memset`, and reading `len`
// from its wide stores stalled. (Copying a short key out of the buffer still waits for that
// `memset` once.)
#[repr(C)]
struct Sink {
    /// Bytes used in the active buffer.
    len: usize,
    /// Created when the input outgrows the small buffer.
    hasher: Option<Box<blake3::Hasher>>,
    /// The BLAKE3 key, for keyed mode.
    key: Option<[u8; 32]>,
    large: Vec<u8>,
    /// The active buffer's bytes: `small` until it overflows, then `large` for good.
    small: Small,
}

/// The small buffer, aligned so that a short key's bytes are copied out of it in aligned 16-byte
/// moves (one of the stores that copy makes is then read whole by the next copy, not assembled).
#[repr(align(16))]
struct Small([u8; SMALL_BUFFER]);

impl std::ops::Deref for Small {
    type Target = [u8; SMALL_BUFFER];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Small {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Sink {
    fn new() -> Self {
        Sink::with(None)
    }

    fn with(key: Option<[u8; 32]>) -> Self {
        Sink {
            key,
            hasher: None,
            small: Small([0; SMALL_BUFFER]),
            large: Vec::new(),
            len: 0,
        }
    }

    /// The incremental hasher, created on first use.
    fn hasher(&mut self) -> &mut blake3::Hasher {
        let key = self.key;
        self.hasher.get_or_insert_with(|| new_hasher(key))
    }

    /// Hashes what the active buffer holds and empties it.
    fn flush(&mut self) {
        let len = std::mem::take(&mut self.len);
        let key = self.key;
        let hasher = self.hasher.get_or_insert_with(|| new_hasher(key));
        if self.large.is_empty() {
            hasher.update(&self.small[..len]);
        } else {
            hasher.update(&self.large[..len]);
        }
    }

    /// The room left in the active buffer, or `None` when `n` bytes do not fit.
    #[inline(always)]
    fn room(&mut self, n: usize) -> Option<&mut [u8]> {
        let start = self.len;
        let buffer: &mut [u8] = if self.large.is_empty() {
            &mut self.small[..]
        } else {
            &mut self.large
        };
        let room = buffer.get_mut(start..start + n)?;
        self.len = start + n;
        Some(room)
    }

    /// Buffers `bytes`; inlined so that the common fixed-size writes compile to a few moves.
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) {
        match self.room(bytes.len()) {
            Some(room) => room.copy_from_slice(bytes),
            None => self.write_spilling(bytes),
        }
    }

    /// The rare path of [`Sink::write`]: moves to the large buffer, or hashes a full one.
    #[cold]
    #[inline(never)]
    fn write_spilling(&mut self, bytes: &[u8]) {
        if self.large.is_empty() {
            self.large = vec![0; LARGE_BUFFER];
            self.large[..self.len].copy_from_slice(&self.small[..self.len]);
        } else {
            self.flush();
        }
        if bytes.len() > LARGE_BUFFER - self.len {
            self.flush();
            self.hasher().update(bytes);
        } else {
            self.large[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    /// Writes a tag byte and a fixed-width value.
    #[inline(always)]
    fn tagged(&mut self, tag: u8, bytes: &[u8]) {
        match self.room(1 + bytes.len()) {
            Some(room) => {
                room[0] = tag;
                room[1..].copy_from_slice(bytes);
            }
            None => {
                self.write_spilling(&[tag]);
                self.write_spilling(bytes);
            }
        }
    }

    /// Hashes a large slice without copying it: the buffer is flushed first, and from
    /// [`PARALLEL_FROM`] bytes on BLAKE3 hashes it on the rayon pool.
    fn write_large(&mut self, bytes: &[u8]) {
        if bytes.len() < LARGE_BUFFER {
            self.write(bytes);
            return;
        }
        self.flush();
        if bytes.len() >= PARALLEL_FROM {
            self.hasher().update_rayon(bytes);
        } else {
            self.hasher().update(bytes);
        }
    }

    fn len_prefixed(&mut self, tag: u8, bytes: &[u8]) {
        self.tagged(tag, &(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    fn finish(mut self) -> [u8; 32] {
        if self.hasher.is_none() && self.large.is_empty() {
            let bytes = &self.small[..self.len];
            let hash = match &self.key {
                Some(key) => blake3::keyed_hash(key, bytes),
                None => blake3::hash(bytes),
            };
            return *hash.as_bytes();
        }
        self.flush();
        *self.hasher().finalize().as_bytes()
    }
}

fn new_hasher(key: Option<[u8; 32]>) -> Box<blake3::Hasher> {
    Box::new(match key {
        Some(key) => blake3::Hasher::new_keyed(&key),
        None => blake3::Hasher::new(),
    })
}

/// The part of every key that depends on the function only: BLAKE3 of the key domain, the
/// function's identity and its version. Computed once per function; each call's key is then
/// BLAKE3 in keyed mode, with this as the key, over the arguments alone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FunctionKey([u8; 32]);

impl FunctionKey {
    /// The function key of a function with the given identity and version hash.
    pub fn new(identity: &str, version: &str) -> Self {
        let mut sink = Sink::new();
        sink.write(KEY_DOMAIN);
        sink.len_prefixed(tag::STR, identity.as_bytes());
        sink.len_prefixed(tag::STR, version.as_bytes());
        FunctionKey(sink.finish())
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for FunctionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FunctionKey({})",
            blake3::Hash::from_bytes(self.0).to_hex()
        )
    }
}

/// A primitive integer (8 to 64 bits) or float: its slices are keyed as raw bytes
/// ([`ArgsHasher::numbers`]), and a `Vec` or [`Array`](crate::Array) of them is stored as raw
/// bytes. Sealed.
pub trait Number: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The tag of the element type in the key encoding.
    #[doc(hidden)]
    const TAG: u8;
    /// Whether some values have more than one bit pattern for one key (NaNs): floats.
    #[doc(hidden)]
    const FLOAT: bool = false;
    /// Whether some value needs its canonical form (a NaN that is not the canonical one), so
    /// that the raw bytes cannot be hashed as they are. Integers never do.
    #[doc(hidden)]
    fn needs_canonical(_values: &[Self]) -> bool {
        false
    }
    /// The value's little-endian bytes in canonical form, appended to `out`.
    #[doc(hidden)]
    fn write_canonical(self, out: &mut Vec<u8>) {
        self.write_le(out);
    }
    /// The value's little-endian bytes as they are, appended to `out`.
    #[doc(hidden)]
    fn write_le(self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(bytemuck::bytes_of(&self));
        if cfg!(target_endian = "big") {
            out[start..].reverse();
        }
    }
    /// Turns values read as little-endian bytes into native ones (nothing to do on
    /// little-endian machines).
    #[doc(hidden)]
    fn from_le_in_place(values: &mut [Self]) {
        if cfg!(target_endian = "big") {
            for value in values {
                bytemuck::bytes_of_mut(value).reverse();
            }
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! numbers {
    ($($ty:ty => $tag:expr),*) => {$(
        impl sealed::Sealed for $ty {}
        impl Number for $ty {
            const TAG: u8 = $tag;
        }
    )*};
}

numbers!(
    u8 => tag::U8, u16 => tag::U16, u32 => tag::U32, u64 => tag::U64,
    i8 => tag::I8, i16 => tag::I16, i32 => tag::I32, i64 => tag::I64
);

macro_rules! float_numbers {
    ($($ty:ty => $tag:expr),*) => {$(
        impl sealed::Sealed for $ty {}
        impl Number for $ty {
            const TAG: u8 = $tag;
            const FLOAT: bool = true;
            fn needs_canonical(values: &[Self]) -> bool {
                // Branch-free per chunk, so that it vectorizes; stops at the first chunk with a NaN.
                values
                    .chunks(1024)
                    .any(|chunk| chunk.iter().fold(false, |nan, v| nan | v.is_nan()))
            }
            fn write_canonical(self, out: &mut Vec<u8>) {
                let value = if self.is_nan() { <$ty>::NAN } else { self };
                value.write_le(out);
            }
        }
    )*};
}

float_numbers!(f32 => tag::F32, f64 => tag::F64);

/// [`Number::needs_canonical`] on the rayon pool, a quarter of [`PARALLEL_FROM`] bytes per task.
fn needs_canonical_in_parallel<T: Number>(values: &[T]) -> bool {
    use rayon::prelude::*;
    let per_task = (PARALLEL_FROM / 4 / std::mem::size_of::<T>().max(1)).max(1);
    values
        .par_chunks(per_task)
        .any(|chunk| T::needs_canonical(chunk))
}

/// Streams a function call's arguments into a [`CacheKey`], keyed by its [`FunctionKey`].
///
/// Generated code creates one per call and feeds it each argument with
/// [`ArgsHasher::arg`] (or [`ArgsHasher::numbers`] for a slice or `Vec` of numbers); the first
/// `Serialize` error is kept and reported by [`ArgsHasher::finish`].
pub struct ArgsHasher {
    sink: Sink,
    error: Option<KeyError>,
    mode: Mode,
    /// Set when a large slice of floats was hashed as it is, not looked at ([`Mode::Optimistic`]).
    unchecked: bool,
    /// Set when a slice of floats holds a NaN ([`Mode::Checking`]).
    nan_seen: bool,
}

/// How an [`ArgsHasher`] treats slices of floats, whose NaNs all key alike.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Each NaN hashed in its canonical form: the key.
    Canonical,
    /// Large slices hashed as they are, without looking for NaNs (a fifth to a third of the
    /// time of a hit): the key when they hold no NaN, and otherwise a key that no canonical one
    /// equals (see [`CachedFunction::key_checked`](crate::function::CachedFunction::key_checked)).
    Optimistic,
    /// Nothing hashed: only looks for NaNs in slices of floats.
    Checking,
}

impl ArgsHasher {
    /// Starts a key for a function with the given identity and version hash.
    pub fn new(identity: &str, version: &str) -> Self {
        ArgsHasher::for_function(&FunctionKey::new(identity, version))
    }

    /// Starts a key for the function whose [`FunctionKey`] is given (the cheap way: compute the
    /// function key once).
    pub fn for_function(function: &FunctionKey) -> Self {
        ArgsHasher {
            sink: Sink::with(Some(function.0)),
            error: None,
            mode: Mode::Canonical,
            unchecked: false,
            nan_seen: false,
        }
    }

    /// [`ArgsHasher::for_function`] that hashes large slices of floats as they are: see
    /// [`ArgsHasher::unchecked`].
    pub(crate) fn optimistic(function: &FunctionKey) -> Self {
        ArgsHasher {
            mode: Mode::Optimistic,
            ..ArgsHasher::for_function(function)
        }
    }

    /// A hasher that hashes nothing and only looks for NaNs in the slices of floats it is
    /// given: see [`ArgsHasher::nan_seen`].
    pub(crate) fn checking() -> Self {
        ArgsHasher {
            mode: Mode::Checking,
            ..ArgsHasher::for_function(&FunctionKey([0; 32]))
        }
    }

    /// Whether a large slice of floats was hashed as it is, unlooked at
    /// ([`ArgsHasher::optimistic`]): the key is then the canonical one if the slice holds no
    /// NaN. When it does hold one, the key differs from every canonical key (the bytes of a
    /// canonical key hold no NaN but the canonical one, where this key's bytes hold another),
    /// so it can only miss.
    pub(crate) fn unchecked(&self) -> bool {
        self.unchecked
    }

    /// Whether a slice of floats given to a [`ArgsHasher::checking`] hasher holds a NaN.
    pub(crate) fn nan_seen(&self) -> bool {
        self.nan_seen
    }

    /// Adds one argument that is a slice of numbers, hashed as its little-endian bytes (on
    /// little-endian machines, straight from memory and on several threads when it is large):
    /// `ARG`, `NUMBERS`, the element tag, the length as a `u64`, then the elements, each NaN in
    /// canonical form. Generated code uses it for arguments of type `&[T]`, `Vec<T>` and
    /// `&Vec<T>` with `T` a primitive number; such an argument's key therefore differs from the
    /// one [`ArgsHasher::arg`] would give it (the same function always uses the same one).
    /// ([`CachedFunction::key_checked`](crate::function::CachedFunction::key_checked) first
    /// hashes large slices of floats as they are, NaNs included, and hashes them again in
    /// canonical form only when that key finds nothing stored and a NaN is there.)
    pub fn numbers<T: Number>(&mut self, values: &[T]) {
        if self.error.is_some() {
            return;
        }
        if self.mode == Mode::Checking {
            if T::FLOAT && !self.nan_seen {
                self.nan_seen = if std::mem::size_of_val(values) < PARALLEL_FROM {
                    T::needs_canonical(values)
                } else {
                    needs_canonical_in_parallel(values)
                };
            }
            return;
        }
        self.sink.write(&[tag::ARG, tag::NUMBERS, T::TAG]);
        self.sink.write(&(values.len() as u64).to_le_bytes());
        if cfg!(target_endian = "little") {
            let raw: &[u8] = bytemuck::cast_slice(values);
            if self.mode == Mode::Optimistic && T::FLOAT && raw.len() >= LARGE_BUFFER {
                self.sink.write_large(raw);
                self.unchecked = true;
                return;
            }
            if raw.len() < PARALLEL_FROM {
                if !T::needs_canonical(values) {
                    self.sink.write_large(raw);
                    return;
                }
            } else {
                // Large: the look for NaNs runs beside the hash of the raw bytes (on the same
                // threads: BLAKE3 is the slower of the two, and the look alone took a fifth of
                // a hit of 100 MB). With a NaN to put in canonical form (rare), that hash is
                // thrown away and the values are hashed again below.
                self.sink.flush();
                let before = self.sink.hasher().clone();
                let sink = &mut self.sink;
                let (needs, ()) = rayon::join(
                    || needs_canonical_in_parallel(values),
                    || sink.write_large(raw),
                );
                if !needs {
                    return;
                }
                *self.sink.hasher() = before;
            }
        }
        let mut out = Vec::with_capacity(LARGE_BUFFER);
        for chunk in values.chunks(LARGE_BUFFER / std::mem::size_of::<T>().max(1)) {
            out.clear();
            for value in chunk {
                value.write_canonical(&mut out);
            }
            self.sink.write_large(&out);
        }
    }

    /// Adds one argument to the key.
    pub fn arg<T: ?Sized + Serialize>(&mut self, value: &T) {
        if self.error.is_some() || self.mode == Mode::Checking {
            return;
        }
        self.sink.write(&[tag::ARG]);
        let mut serializer = KeySerializer::new(&mut self.sink);
        serializer.note::<T>();
        if let Err(error) = value.serialize(&mut serializer) {
            self.error = Some(error);
        }
    }

    /// The call's key, keeping short encoded arguments as they are so that the memory tier can
    /// look them up without hashing; or the first error an argument's `Serialize`
    /// implementation returned.
    pub fn finish_call(mut self) -> Result<CallKey, KeyError> {
        self.take_call()
    }

    /// [`ArgsHasher::finish_call`] without moving the hasher (a few hundred bytes, which a
    /// small hit would otherwise copy). The hasher is spent: it is not to be used again (it is
    /// left empty, or as it was for short arguments).
    #[inline]
    pub(crate) fn take_call(&mut self) -> Result<CallKey, KeyError> {
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        let sink = &mut self.sink;
        let function = sink.key.unwrap_or_default();
        if sink.hasher.is_none() && sink.large.is_empty() && sink.len <= SHORT_ARGS {
            // All of the first SHORT_ARGS bytes, in one fixed-size copy (the small buffer is
            // zero past what was written): a copy of `len` bytes is a call to `memcpy`, and
            // the reads of the key that follow would wait for its stores (a tenth of a hit).
            debug_assert!(sink.small[sink.len..SHORT_ARGS].iter().all(|&b| b == 0));
            let mut bytes = Aligned([0u8; SHORT_ARGS]);
            bytes.0.copy_from_slice(&sink.small[..SHORT_ARGS]);
            return Ok(CallKey {
                bytes,
                function,
                len: sink.len as u8,
            });
        }
        let sink = std::mem::replace(sink, Sink::with(None));
        Ok(CallKey::hashed(CacheKey(sink.finish())))
    }

    /// The key, or the first error an argument's `Serialize` implementation returned.
    pub fn finish(self) -> Result<CacheKey, KeyError> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(CacheKey(self.sink.finish())),
        }
    }
}

/// Encoded arguments up to this many bytes are kept as they are in a [`CallKey`].
pub(crate) const SHORT_ARGS: usize = 48;

/// The encoded arguments of a call whose parameters are all primitive values (integers, floats,
/// `bool`, `char`), written straight into a [`CallKey`]'s bytes: the bytes
/// [`ArgsHasher::arg`] writes for each, without the serializer and the hasher's buffers (a third
/// of a hit from memory). Generated code fills one first, through
/// [`ShortArg`](crate::function::ShortArg); when a parameter is of another type, or the
/// arguments do not fit in a short key, it is marked, and the call is keyed through an
/// [`ArgsHasher`] instead
/// ([`CachedFunction::key_short`](crate::function::CachedFunction::key_short)). For generated
/// code: not a stable interface.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct ShortArgs {
    bytes: Aligned,
    len: usize,
    /// A parameter was not a primitive value, or the arguments did not fit.
    other: bool,
}

impl Default for ShortArgs {
    fn default() -> Self {
        ShortArgs::new()
    }
}

impl ShortArgs {
    /// No arguments yet.
    pub fn new() -> Self {
        ShortArgs {
            bytes: Aligned([0; SHORT_ARGS]),
            len: 0,
            other: false,
        }
    }

    /// Adds one argument: `ARG`, the value's tag, then its bytes, as
    /// [`ArgsHasher::arg`] writes a primitive value. Past [`SHORT_ARGS`] bytes, marks the
    /// arguments as not short.
    #[inline(always)]
    pub(crate) fn push(&mut self, tag: u8, value: &[u8]) {
        let start = self.len;
        let end = start + 2 + value.len();
        if end > SHORT_ARGS {
            self.other = true;
            return;
        }
        self.bytes.0[start] = tag::ARG;
        self.bytes.0[start + 1] = tag;
        self.bytes.0[start + 2..end].copy_from_slice(value);
        self.len = end;
    }

    /// Marks a parameter that is not a primitive value: the call is keyed through an
    /// [`ArgsHasher`].
    pub fn other(&mut self) {
        self.other = true;
    }

    /// The call's key, the one an [`ArgsHasher`] keyed by `function` would give; `None` when a
    /// parameter was not a primitive value or the arguments did not fit.
    pub(crate) fn call_key(&self, function: &FunctionKey) -> Option<CallKey> {
        (!self.other).then_some(CallKey {
            bytes: self.bytes,
            function: function.0,
            len: self.len as u8,
        })
    }
}

macro_rules! short_values {
    ($($ty:ty => |$v:ident| ($tag:expr, $bytes:expr)),* $(,)?) => {$(
        impl crate::function::ShortArg for crate::function::Arg<'_, $ty> {
            #[inline(always)]
            fn short_into(&self, args: &mut ShortArgs) {
                let $v: $ty = *self.0;
                args.push($tag, &$bytes);
            }
        }

        impl crate::function::ShortArg for crate::function::Arg<'_, &$ty> {
            #[inline(always)]
            fn short_into(&self, args: &mut ShortArgs) {
                let $v: $ty = **self.0;
                args.push($tag, &$bytes);
            }
        }
    )*};
}

// The bytes of `KeySerializer`'s `serialize_*` for each type (`usize` and `isize` are
// serialized as 64-bit values, and every NaN as the canonical one). Only types whose `Serialize`
// is one call of a `serialize_*` for a fixed-width value belong here: any other would key
// differently from the serializer and split the cache (the tests check every type listed).
short_values!(
    bool => |v| (tag::BOOL, [u8::from(v)]),
    i8 => |v| (tag::I8, v.to_le_bytes()),
    i16 => |v| (tag::I16, v.to_le_bytes()),
    i32 => |v| (tag::I32, v.to_le_bytes()),
    i64 => |v| (tag::I64, v.to_le_bytes()),
    i128 => |v| (tag::I128, v.to_le_bytes()),
    isize => |v| (tag::I64, (v as i64).to_le_bytes()),
    u8 => |v| (tag::U8, v.to_le_bytes()),
    u16 => |v| (tag::U16, v.to_le_bytes()),
    u32 => |v| (tag::U32, v.to_le_bytes()),
    u64 => |v| (tag::U64, v.to_le_bytes()),
    u128 => |v| (tag::U128, v.to_le_bytes()),
    usize => |v| (tag::U64, (v as u64).to_le_bytes()),
    f32 => |v| (tag::F32, canonical_f32(v).to_le_bytes()),
    f64 => |v| (tag::F64, canonical_f64(v).to_le_bytes()),
    char => |v| (tag::CHAR, u32::from(v).to_le_bytes()),
);

/// The bits a float is keyed by: every NaN as the canonical one.
fn canonical_f32(v: f32) -> u32 {
    if v.is_nan() {
        f32::NAN.to_bits()
    } else {
        v.to_bits()
    }
}

/// [`canonical_f32`] for `f64`.
fn canonical_f64(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else {
        v.to_bits()
    }
}

/// One call's key, as [`ArgsHasher::finish_call`] leaves it: short encoded arguments as they are
/// (the memory tier compares them byte for byte, so a hit there needs no hashing), longer ones
/// already hashed. [`CallKey::digest`] gives the [`CacheKey`] either way.
//
// Laid out for plain copies: the bytes first, aligned, so that each copy of a key (it is returned,
// passed on, and copied into the memory tier's key) moves them in the same aligned 16-byte
// pieces, and each piece a copy reads is one that the previous copy stored whole. (As an enum
// of a length byte and the bytes, they sat one byte off, and each copy read pieces that spanned
// two stores: a stall of some 15 cycles each, a tenth of a hit from memory.)
#[derive(Clone, Copy)]
#[repr(C)]
pub struct CallKey {
    /// Short: the encoded arguments, zero past `len`. Hashed: the key, then zeros.
    bytes: Aligned,
    /// The function key (short form only; zeros otherwise).
    function: [u8; 32],
    /// The length of the short encoded arguments, or [`HASHED`].
    len: u8,
}

/// [`CallKey::len`] of a key in hashed form (short arguments are at most [`SHORT_ARGS`] long).
const HASHED: u8 = u8::MAX;

/// [`SHORT_ARGS`] bytes, aligned for 16-byte moves.
#[derive(Clone, Copy)]
#[repr(align(16))]
pub(crate) struct Aligned(pub(crate) [u8; SHORT_ARGS]);

// Whole 16-byte pieces, which `Aligned::eq` compares (none left over).
const _: () = assert!(SHORT_ARGS.is_multiple_of(16));

impl PartialEq for Aligned {
    /// Compares all the bytes, 16 at a time and without a branch between the pieces: the
    /// derived comparison called `memcmp`, 4 % of a hit from the memory tier.
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        let (ours, theirs) = (self.0.as_chunks::<16>().0, other.0.as_chunks::<16>().0);
        let mut differ = 0;
        for (a, b) in ours.iter().zip(theirs) {
            differ |= u128::from_ne_bytes(*a) ^ u128::from_ne_bytes(*b);
        }
        differ == 0
    }
}

impl Eq for Aligned {}

impl CallKey {
    /// The entry's key: BLAKE3 keyed by the function key over the encoded arguments.
    pub fn digest(&self) -> CacheKey {
        match self.short_args() {
            Some(args) => CacheKey(*blake3::keyed_hash(&self.function, args).as_bytes()),
            None => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&self.bytes.0[..32]);
                CacheKey(key)
            }
        }
    }

    /// A call key of the short form with these bytes (zero past `len`), for tests.
    #[cfg(test)]
    pub(crate) fn short(bytes: [u8; SHORT_ARGS], len: u8) -> Self {
        CallKey {
            bytes: Aligned(bytes),
            function: [0; 32],
            len,
        }
    }

    /// A call key of the hashed form, for a key computed elsewhere.
    pub fn hashed(key: CacheKey) -> Self {
        let mut bytes = Aligned([0u8; SHORT_ARGS]);
        bytes.0[..32].copy_from_slice(key.as_bytes());
        CallKey {
            bytes,
            function: [0; 32],
            len: HASHED,
        }
    }

    /// The encoded arguments, when they are short enough to be kept.
    pub fn short_args(&self) -> Option<&[u8]> {
        self.short_padded().map(|(len, args)| &args.0[..len])
    }

    /// [`CallKey::short_args`] as their length and all [`SHORT_ARGS`] bytes kept, zero past
    /// that length (for copies of a fixed size).
    pub(crate) fn short_padded(&self) -> Option<(usize, &Aligned)> {
        (self.len != HASHED).then_some((usize::from(self.len), &self.bytes))
    }
}

impl fmt::Debug for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CallKey({})", self.digest())
    }
}

/// Whether values of the type named `name` iterate in an order that means nothing (and changes
/// from process to process), so that they must be keyed order-independently.
fn is_unordered(mut name: &str) -> bool {
    const WRAPPERS: [&str; 5] = [
        "alloc::boxed::Box<",
        "alloc::rc::Rc<",
        "alloc::sync::Arc<",
        "std::rc::Rc<",
        "std::sync::Arc<",
    ];
    loop {
        name = name.trim_start_matches('&');
        name = name.strip_prefix("mut ").unwrap_or(name);
        // Only `alloc::`, `std::` and `hashbrown::` names can be (or wrap) an unordered one.
        if !matches!(name.as_bytes().first(), Some(b'a' | b's' | b'h')) {
            return false;
        }
        match WRAPPERS.iter().find_map(|w| name.strip_prefix(w)) {
            Some(inner) => name = inner,
            None => break,
        }
    }
    [
        "std::collections::hash::map::HashMap<",
        "std::collections::hash::set::HashSet<",
        "hashbrown::map::HashMap<",
        "hashbrown::set::HashSet<",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

/// The serde serializer behind [`ArgsHasher`].
struct KeySerializer<'a> {
    sink: &'a mut Sink,
    /// The static type of the value about to be serialized, set by [`KeySerializer::note`]; looked
    /// at only when a sequence or map starts, to tell unordered collections.
    next_type: &'static str,
}

impl<'a> KeySerializer<'a> {
    fn new(sink: &'a mut Sink) -> Self {
        KeySerializer {
            sink,
            next_type: "",
        }
    }

    /// Records the static type of the value about to be serialized (serde tells us nothing else).
    #[inline]
    fn note<T: ?Sized>(&mut self) {
        self.next_type = std::any::type_name::<T>();
    }

    /// Whether the sequence or map starting now is an unordered collection.
    fn starts_unordered(&mut self) -> bool {
        is_unordered(std::mem::take(&mut self.next_type))
    }

    fn child<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), KeyError> {
        self.note::<T>();
        value.serialize(&mut *self)
    }

    fn compound(&mut self, tag: u8, unordered: bool) -> Compound<'_, 'a> {
        if unordered {
            self.sink.write(&[tag::UNORDERED, tag]);
            Compound::Unordered {
                parent: self,
                digests: Vec::new(),
                entry: None,
            }
        } else {
            self.sink.write(&[tag]);
            Compound::Ordered(self)
        }
    }
}

/// A sequence, tuple, map or struct being hashed: in order, or entry by entry for unordered
/// collections (each entry's digest is kept, and the sorted digests are written at the end).
enum Compound<'s, 'a> {
    Ordered(&'s mut KeySerializer<'a>),
    Unordered {
        parent: &'s mut KeySerializer<'a>,
        digests: Vec<[u8; 32]>,
        entry: Option<Box<Sink>>,
    },
}

impl Compound<'_, '_> {
    fn element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), KeyError> {
        match self {
            Compound::Ordered(serializer) => serializer.child(value),
            Compound::Unordered { digests, .. } => {
                let mut sink = Sink::new();
                KeySerializer::new(&mut sink).child(value)?;
                digests.push(sink.finish());
                Ok(())
            }
        }
    }

    fn map_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), KeyError> {
        match self {
            Compound::Ordered(serializer) => serializer.child(key),
            Compound::Unordered { entry, .. } => {
                let mut sink = Box::new(Sink::new());
                KeySerializer::new(&mut sink).child(key)?;
                *entry = Some(sink);
                Ok(())
            }
        }
    }

    fn map_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), KeyError> {
        match self {
            Compound::Ordered(serializer) => serializer.child(value),
            Compound::Unordered { digests, entry, .. } => {
                let mut sink = entry
                    .take()
                    .ok_or_else(|| KeyError("map value serialized before its key".into()))?;
                KeySerializer::new(&mut sink).child(value)?;
                digests.push((*sink).finish());
                Ok(())
            }
        }
    }

    fn field<T: ?Sized + Serialize>(&mut self, name: &str, value: &T) -> Result<(), KeyError> {
        let serializer = match self {
            Compound::Ordered(serializer) => serializer,
            Compound::Unordered { parent, .. } => parent,
        };
        serializer.sink.len_prefixed(tag::STR, name.as_bytes());
        serializer.child(value)
    }

    fn end(self) -> Result<(), KeyError> {
        match self {
            Compound::Ordered(serializer) => serializer.sink.write(&[tag::END]),
            Compound::Unordered {
                parent,
                mut digests,
                ..
            } => {
                digests.sort_unstable();
                parent
                    .sink
                    .tagged(tag::END, &(digests.len() as u64).to_le_bytes());
                for digest in &digests {
                    parent.sink.write(digest);
                }
            }
        }
        Ok(())
    }
}

macro_rules! forward_compound {
    ($($trait:ident { $method:ident($($arg:ident: $ty:ty),*) => $via:ident })*) => {$(
        impl ser::$trait for Compound<'_, '_> {
            type Ok = ();
            type Error = KeyError;

            fn $method<T: ?Sized + Serialize>(&mut self, $($arg: $ty,)* value: &T) -> Result<(), KeyError> {
                forward_compound!(@call self, $via, $($arg,)* value)
            }

            fn end(self) -> Result<(), KeyError> {
                Compound::end(self)
            }
        }
    )*};
    (@call $self:ident, element, $value:ident) => { $self.element($value) };
    (@call $self:ident, field, $name:ident, $value:ident) => { $self.field($name, $value) };
}

forward_compound! {
    SerializeSeq { serialize_element() => element }
    SerializeTuple { serialize_element() => element }
    SerializeTupleStruct { serialize_field() => element }
    SerializeTupleVariant { serialize_field() => element }
    SerializeStruct { serialize_field(name: &'static str) => field }
    SerializeStructVariant { serialize_field(name: &'static str) => field }
}

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = KeyError;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), KeyError> {
        self.map_key(key)
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), KeyError> {
        self.map_value(value)
    }

    fn end(self) -> Result<(), KeyError> {
        Compound::end(self)
    }
}

impl<'s, 'a> ser::Serializer for &'s mut KeySerializer<'a> {
    type Ok = ();
    type Error = KeyError;
    type SerializeSeq = Compound<'s, 'a>;
    type SerializeTuple = Compound<'s, 'a>;
    type SerializeTupleStruct = Compound<'s, 'a>;
    type SerializeTupleVariant = Compound<'s, 'a>;
    type SerializeMap = Compound<'s, 'a>;
    type SerializeStruct = Compound<'s, 'a>;
    type SerializeStructVariant = Compound<'s, 'a>;

    fn serialize_bool(self, v: bool) -> Result<(), KeyError> {
        self.sink.tagged(tag::BOOL, &[v as u8]);
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), KeyError> {
        self.sink.tagged(tag::I8, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Result<(), KeyError> {
        self.sink.tagged(tag::I16, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Result<(), KeyError> {
        self.sink.tagged(tag::I32, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Result<(), KeyError> {
        self.sink.tagged(tag::I64, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<(), KeyError> {
        self.sink.tagged(tag::I128, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), KeyError> {
        self.sink.tagged(tag::U8, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Result<(), KeyError> {
        self.sink.tagged(tag::U16, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Result<(), KeyError> {
        self.sink.tagged(tag::U32, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Result<(), KeyError> {
        self.sink.tagged(tag::U64, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), KeyError> {
        self.sink.tagged(tag::U128, &v.to_le_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), KeyError> {
        self.sink.tagged(tag::F32, &canonical_f32(v).to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), KeyError> {
        self.sink.tagged(tag::F64, &canonical_f64(v).to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), KeyError> {
        self.sink.tagged(tag::CHAR, &u32::from(v).to_le_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), KeyError> {
        self.sink.len_prefixed(tag::STR, v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), KeyError> {
        self.sink.len_prefixed(tag::BYTES, v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), KeyError> {
        self.sink.write(&[tag::NONE]);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), KeyError> {
        self.sink.write(&[tag::SOME]);
        self.child(value)
    }
    fn serialize_unit(self) -> Result<(), KeyError> {
        self.sink.write(&[tag::UNIT]);
        Ok(())
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<(), KeyError> {
        self.sink.len_prefixed(tag::UNIT_STRUCT, name.as_bytes());
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<(), KeyError> {
        self.sink.len_prefixed(tag::UNIT_VARIANT, name.as_bytes());
        self.sink.tagged(tag::U32, &index.to_le_bytes());
        self.sink.len_prefixed(tag::STR, variant.as_bytes());
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), KeyError> {
        self.sink.len_prefixed(tag::NEWTYPE_STRUCT, name.as_bytes());
        self.child(value)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), KeyError> {
        self.sink
            .len_prefixed(tag::NEWTYPE_VARIANT, name.as_bytes());
        self.sink.tagged(tag::U32, &index.to_le_bytes());
        self.sink.len_prefixed(tag::STR, variant.as_bytes());
        self.child(value)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'s, 'a>, KeyError> {
        let unordered = self.starts_unordered();
        Ok(self.compound(tag::SEQ, unordered))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Compound<'s, 'a>, KeyError> {
        Ok(self.compound(tag::TUPLE, false))
    }
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Compound<'s, 'a>, KeyError> {
        self.sink.len_prefixed(tag::TUPLE_STRUCT, name.as_bytes());
        Ok(self.compound(tag::TUPLE_STRUCT, false))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'s, 'a>, KeyError> {
        self.sink.len_prefixed(tag::TUPLE_VARIANT, name.as_bytes());
        self.sink.tagged(tag::U32, &index.to_le_bytes());
        self.sink.len_prefixed(tag::STR, variant.as_bytes());
        Ok(self.compound(tag::TUPLE_VARIANT, false))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'s, 'a>, KeyError> {
        let unordered = self.starts_unordered();
        Ok(self.compound(tag::MAP, unordered))
    }
    fn serialize_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Compound<'s, 'a>, KeyError> {
        self.sink.len_prefixed(tag::STRUCT, name.as_bytes());
        Ok(self.compound(tag::STRUCT, false))
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'s, 'a>, KeyError> {
        self.sink.len_prefixed(tag::STRUCT_VARIANT, name.as_bytes());
        self.sink.tagged(tag::U32, &index.to_le_bytes());
        self.sink.len_prefixed(tag::STR, variant.as_bytes());
        Ok(self.compound(tag::STRUCT_VARIANT, false))
    }
    fn is_human_readable(&self) -> bool {
        // The compact forms (e.g. of IP addresses) are cheaper to hash and just as unique.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn key<T: ?Sized + Serialize>(value: &T) -> CacheKey {
        let mut hasher = ArgsHasher::new("crate::f", "v");
        hasher.arg(value);
        hasher.finish().unwrap()
    }

    #[test]
    fn equal_values_give_equal_keys_and_different_values_differ() {
        assert_eq!(key(&42u64), key(&42u64));
        assert_ne!(key(&42u64), key(&43u64));
        assert_ne!(key("ab"), key("a"));
        assert_ne!(key(&("a", "bc")), key(&("ab", "c")));
        assert_ne!(key(&vec![1u8, 2]), key(&vec![2u8, 1]));
    }

    #[test]
    fn identity_and_version_are_part_of_the_key() {
        let base = key(&1u8);
        let mut other = ArgsHasher::new("crate::g", "v");
        other.arg(&1u8);
        assert_ne!(base, other.finish().unwrap());
        let mut other = ArgsHasher::new("crate::f", "w");
        other.arg(&1u8);
        assert_ne!(base, other.finish().unwrap());
    }

    #[test]
    fn argument_boundaries_are_part_of_the_key() {
        let mut one = ArgsHasher::new("f", "v");
        one.arg(&(1u8, 2u8));
        let mut two = ArgsHasher::new("f", "v");
        two.arg(&1u8);
        two.arg(&2u8);
        assert_ne!(one.finish().unwrap(), two.finish().unwrap());
    }

    #[test]
    fn owned_and_borrowed_forms_agree() {
        let owned: Vec<f64> = vec![1.0, 2.5];
        assert_eq!(key(&owned), key(&owned[..]));
        assert_eq!(key("text"), key(&String::from("text")));
    }

    #[test]
    fn floats_are_keyed_by_bits_with_one_nan() {
        assert_ne!(key(&0.0f64), key(&-0.0f64));
        let other_nan = f64::from_bits(f64::NAN.to_bits() | 1);
        assert!(other_nan.is_nan());
        assert_eq!(key(&f64::NAN), key(&other_nan));
        assert_eq!(key(&f32::NAN), key(&-f32::NAN));
        assert_ne!(key(&1.0f32), key(&1.0f64));
    }

    #[test]
    fn hash_collections_are_order_independent() {
        // Build the same set and map with different insertion orders and capacities, so their
        // iteration orders differ.
        let a: HashSet<u32> = (0..500).collect();
        let mut b: HashSet<u32> = HashSet::with_capacity(4096);
        b.extend((0..500).rev());
        assert_ne!(
            a.iter().copied().collect::<Vec<_>>(),
            b.iter().copied().collect::<Vec<_>>(),
            "test needs two iteration orders"
        );
        assert_eq!(key(&a), key(&b));
        assert_eq!(key(&Some(&a)), key(&Some(&b)));
        assert_eq!(key(&Box::new(a.clone())), key(&Box::new(b.clone())));

        let m: HashMap<String, u32> = (0..300).map(|i| (i.to_string(), i)).collect();
        let mut n: HashMap<String, u32> = HashMap::with_capacity(2048);
        n.extend((0..300).rev().map(|i| (i.to_string(), i)));
        assert_eq!(key(&m), key(&n));
        assert_eq!(key(&vec![m.clone()]), key(&vec![n.clone()]));

        n.insert("0".into(), 1);
        assert_ne!(key(&m), key(&n));
    }

    #[test]
    fn unordered_collections_still_differ_from_ordered_ones() {
        let set: HashSet<u32> = [1].into_iter().collect();
        assert_ne!(key(&set), key(&vec![1u32]));
        let map: HashMap<u32, u32> = [(1, 2)].into_iter().collect();
        let btree: BTreeMap<u32, u32> = [(1, 2)].into_iter().collect();
        assert_ne!(key(&map), key(&btree));
    }

    #[test]
    fn struct_and_field_names_are_part_of_the_key() {
        #[derive(Serialize)]
        struct A {
            x: u32,
        }
        #[derive(Serialize)]
        struct B {
            x: u32,
        }
        #[derive(Serialize)]
        struct C {
            y: u32,
        }
        assert_ne!(key(&A { x: 1 }), key(&B { x: 1 }));
        assert_ne!(key(&A { x: 1 }), key(&C { y: 1 }));
        assert_eq!(key(&A { x: 1 }), key(&A { x: 1 }));
    }

    #[test]
    fn untagged_enum_variants_do_not_collide() {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum E {
            Num(u64),
            Text(String),
        }
        assert_ne!(key(&E::Num(0)), key(&E::Text(String::new())));
    }

    #[test]
    fn large_inputs_match_across_buffer_boundaries() {
        let values: Vec<f64> = (0..200_000).map(|i| i as f64).collect();
        assert_eq!(key(&values), key(&values.clone()));
        let mut changed = values.clone();
        changed[150_000] = -1.0;
        assert_ne!(key(&values), key(&changed));
        let text = "x".repeat(3 * LARGE_BUFFER + 7);
        assert_ne!(key(&text), key(&text[1..]));
    }

    #[test]
    fn the_byte_stream_is_the_documented_encoding_whatever_the_buffering() {
        fn prefixed(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
            out.push(tag);
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        for len in [
            0,
            5,
            SMALL_BUFFER - 40,
            SMALL_BUFFER,
            LARGE_BUFFER - 3,
            3 * LARGE_BUFFER + 7,
        ] {
            let text = "y".repeat(len);
            let mut function = KEY_DOMAIN.to_vec();
            prefixed(&mut function, tag::STR, b"crate::f");
            prefixed(&mut function, tag::STR, b"v");
            let function = blake3::hash(&function);
            let mut expected = vec![tag::ARG];
            prefixed(&mut expected, tag::STR, text.as_bytes());
            expected.push(tag::ARG);
            expected.extend_from_slice(&[tag::U64]);
            expected.extend_from_slice(&7u64.to_le_bytes());
            let mut hasher = ArgsHasher::new("crate::f", "v");
            hasher.arg(text.as_str());
            hasher.arg(&7u64);
            assert_eq!(
                hasher.finish().unwrap().as_bytes(),
                blake3::keyed_hash(function.as_bytes(), &expected).as_bytes(),
                "length {len}"
            );
        }
    }

    fn numbers_key<T: Number>(values: &[T]) -> CacheKey {
        let mut hasher = ArgsHasher::new("crate::f", "v");
        hasher.numbers(values);
        hasher.finish().unwrap()
    }

    #[test]
    fn number_slices_are_keyed_by_their_documented_bytes() {
        for len in [0usize, 3, 1000, LARGE_BUFFER, PARALLEL_FROM / 8 + 5] {
            let values: Vec<f64> = (0..len).map(|i| i as f64 * 0.5 - 7.0).collect();
            let mut expected = vec![tag::ARG, tag::NUMBERS, tag::F64];
            expected.extend_from_slice(&(len as u64).to_le_bytes());
            for v in &values {
                expected.extend_from_slice(&v.to_le_bytes());
            }
            let function = FunctionKey::new("crate::f", "v");
            assert_eq!(
                numbers_key(&values).as_bytes(),
                blake3::keyed_hash(function.as_bytes(), &expected).as_bytes(),
                "length {len}"
            );
        }
    }

    #[test]
    fn a_large_slice_with_a_nan_is_keyed_by_its_canonical_bytes() {
        // Large enough for the raw hash that runs beside the look for NaNs, which is thrown
        // away here: the key is that of the documented bytes, each NaN in canonical form.
        let len = PARALLEL_FROM / 8 * 3 + 5;
        let mut values: Vec<f64> = (0..len).map(|i| i as f64 * 0.25).collect();
        values[len - 2] = -f64::NAN;
        let mut expected = vec![tag::ARG, tag::NUMBERS, tag::F64];
        expected.extend_from_slice(&(len as u64).to_le_bytes());
        for v in &values {
            let v = if v.is_nan() { f64::NAN } else { *v };
            expected.extend_from_slice(&v.to_le_bytes());
        }
        let mut hasher = ArgsHasher::new("crate::f", "v");
        hasher.arg(&"before");
        hasher.numbers(&values);
        let mut reference = ArgsHasher::new("crate::f", "v");
        reference.arg(&"before");
        reference.sink.write_large(&expected);
        assert_eq!(hasher.finish().unwrap(), reference.finish().unwrap());
    }

    #[test]
    fn number_slices_differ_by_type_length_and_value_with_one_nan() {
        assert_ne!(numbers_key(&[1u32, 2]), numbers_key(&[1u64, 2]));
        assert_ne!(numbers_key(&[0u8; 4]), numbers_key(&[0u8; 5]));
        assert_ne!(numbers_key(&[0.0f64]), numbers_key(&[-0.0f64]));
        let big: Vec<f64> = (0..300_000).map(f64::from).collect();
        let mut changed = big.clone();
        changed[299_999] = 1.5;
        assert_ne!(numbers_key(&big), numbers_key(&changed));
        let mut nan = big.clone();
        nan[5] = f64::NAN;
        let mut other_nan = big;
        other_nan[5] = f64::from_bits(f64::NAN.to_bits() | 1);
        assert_eq!(numbers_key(&nan), numbers_key(&other_nan));
        assert_ne!(numbers_key(&[f32::NAN]), numbers_key(&[f32::INFINITY]));
    }

    #[test]
    fn a_call_key_digests_to_the_key_whatever_its_form() {
        for text in [
            "".to_owned(),
            "a".repeat(30),
            "b".repeat(SHORT_ARGS),
            "c".repeat(300),
        ] {
            let mut one = ArgsHasher::new("crate::f", "v");
            one.arg(text.as_str());
            let mut two = ArgsHasher::new("crate::f", "v");
            two.arg(text.as_str());
            let call = one.finish_call().unwrap();
            assert_eq!(
                call.digest(),
                two.finish().unwrap(),
                "length {}",
                text.len()
            );
            assert_eq!(call.short_args().is_some(), text.len() + 10 <= SHORT_ARGS);
        }
    }

    #[test]
    fn an_optimistic_key_is_the_canonical_one_unless_a_nan_is_not_canonical() {
        let function = FunctionKey::new("crate::f", "v");
        let key = |hasher: &mut ArgsHasher, values: &[f64]| {
            hasher.arg("before");
            hasher.numbers(values);
            hasher.numbers(&[1u32, 2, 3]);
            hasher.take_call().unwrap().digest()
        };
        let mut values: Vec<f64> = (0..LARGE_BUFFER).map(|i| i as f64).collect();
        for (nan, same) in [
            (None, true),
            (Some(f64::NAN.to_bits()), true),
            (Some(f64::NAN.to_bits() | 3), false),
            (Some((-f64::NAN).to_bits()), false),
        ] {
            if let Some(bits) = nan {
                values[LARGE_BUFFER / 2] = f64::from_bits(bits);
            }
            let canonical = key(&mut ArgsHasher::for_function(&function), &values);
            let mut hasher = ArgsHasher::optimistic(&function);
            assert_eq!(key(&mut hasher, &values) == canonical, same, "{nan:?}");
            assert!(hasher.unchecked());
            let mut checker = ArgsHasher::checking();
            checker.arg("before");
            checker.numbers(&values);
            assert_eq!(checker.nan_seen(), nan.is_some());
        }
        // Small slices and integers are looked at as before: nothing is left unchecked.
        let mut hasher = ArgsHasher::optimistic(&function);
        hasher.numbers(&[f64::from_bits(f64::NAN.to_bits() | 3)]);
        hasher.numbers(&vec![7u64; LARGE_BUFFER]);
        assert!(!hasher.unchecked());
    }

    #[test]
    fn short_arguments_are_kept_whole_and_padded_with_zeros() {
        // Every length a short key can have (a string argument: 10 bytes of tags and length),
        // after a longer key was made by the same thread (stack bytes left over).
        let mut long = ArgsHasher::new("crate::f", "v");
        long.arg(&"x".repeat(200));
        assert!(long.finish_call().unwrap().short_args().is_none());
        for len in 0..=SHORT_ARGS - 10 {
            let text = "é".repeat(len / 2) + &"z".repeat(len % 2);
            let mut hasher = ArgsHasher::new("crate::f", "v");
            hasher.arg(text.as_str());
            let call = hasher.finish_call().unwrap();
            let (kept, padded) = call.short_padded().unwrap();
            let padded = &padded.0;
            assert_eq!(kept, 10 + text.len());
            assert_eq!(&padded[10..kept], text.as_bytes());
            assert!(padded[kept..].iter().all(|&b| b == 0), "length {len}");
            assert_eq!(call.short_args(), Some(&padded[..kept]));
        }
    }

    #[test]
    fn serialize_errors_are_reported() {
        struct Fails;
        impl Serialize for Fails {
            fn serialize<S: ser::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(ser::Error::custom("cannot serialize this"))
            }
        }
        let mut hasher = ArgsHasher::new("f", "v");
        hasher.arg(&Fails);
        assert_eq!(
            hasher.finish().unwrap_err().to_string(),
            "cannot serialize this"
        );
    }

    #[test]
    fn type_names_of_unordered_collections() {
        assert!(is_unordered(std::any::type_name::<HashSet<u8>>()));
        assert!(is_unordered(std::any::type_name::<&HashMap<u8, u8>>()));
        assert!(is_unordered(std::any::type_name::<
            std::sync::Arc<HashSet<u8>>,
        >()));
        assert!(!is_unordered(std::any::type_name::<Vec<HashSet<u8>>>()));
        assert!(!is_unordered(std::any::type_name::<BTreeMap<u8, u8>>()));
    }

    /// The key generated code gets from [`ShortArgs`] for `write`'s arguments, and the one an
    /// [`ArgsHasher`] gives for `hash`'s, for the same function.
    fn short_and_hashed(
        write: impl Fn(&mut ShortArgs),
        hash: impl Fn(&mut ArgsHasher),
    ) -> (Option<CallKey>, CallKey) {
        let function = FunctionKey::new("crate::f", "v");
        let mut short = ShortArgs::new();
        write(&mut short);
        let mut hasher = ArgsHasher::optimistic(&function);
        hash(&mut hasher);
        (short.call_key(&function), hasher.take_call().unwrap())
    }

    /// Asserts that a short key is the key the hasher gives, byte for byte (the zeros after
    /// the arguments too: the memory tier compares all of them).
    fn same_key(short: Option<CallKey>, hashed: CallKey, what: &str) {
        let short = short.unwrap_or_else(|| panic!("{what}: no short key"));
        let padded = |key: &CallKey| key.short_padded().map(|(len, bytes)| (len, bytes.0));
        assert_eq!(padded(&short), padded(&hashed), "{what}");
        assert_eq!(short.digest(), hashed.digest(), "{what}");
    }

    macro_rules! assert_short_keys {
        ($($ty:ty: [$($value:expr),* $(,)?]),* $(,)?) => {$($({
            use crate::function::{Arg, ShortArg as _};
            let value: $ty = $value;
            let what = format!("{} {:?}", stringify!($ty), value);
            let (short, hashed) = short_and_hashed(
                |s| (&Arg(&value)).short_into(s),
                |h| h.arg(&value),
            );
            same_key(short, hashed, &what);
            // A reference keys as the value does.
            let (short, hashed) = short_and_hashed(
                |s| (&Arg(&&value)).short_into(s),
                |h| h.arg(&value),
            );
            same_key(short, hashed, &format!("&{what}"));
        })*)*};
    }

    #[test]
    #[allow(clippy::needless_borrow)] // The borrow picks the trait, as in generated code.
    fn primitive_values_written_straight_key_as_the_hasher_keys_them() {
        let nan_with_payload = f64::from_bits(0x7ff8_0000_dead_beef);
        let signalling = f32::from_bits(0x7f80_0001);
        assert_short_keys!(
            bool: [false, true],
            i8: [0, -1, i8::MIN, i8::MAX],
            i16: [0, -300, i16::MIN, i16::MAX],
            i32: [0, -70_000, i32::MIN, i32::MAX],
            i64: [0, -5, i64::MIN, i64::MAX],
            i128: [0, -1, i128::MIN, i128::MAX],
            isize: [0, -7, isize::MIN, isize::MAX],
            u8: [0, 7, u8::MAX],
            u16: [0, 300, u16::MAX],
            u32: [0, 70_000, u32::MAX],
            u64: [0, 1, 1 << 40, u64::MAX],
            u128: [0, 1, u128::MAX],
            usize: [0, 9, usize::MAX],
            f32: [0.0, -0.0, 1.5, f32::INFINITY, f32::NAN, -f32::NAN, signalling],
            f64: [0.0, -0.0, -2.25, f64::NEG_INFINITY, f64::NAN, -f64::NAN, nan_with_payload],
            char: ['a', '\0', '\u{10FFFF}'],
        );
    }

    #[test]
    fn aligned_bytes_are_equal_only_when_every_byte_is() {
        let bytes: [u8; SHORT_ARGS] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let ours = Aligned(bytes);
        assert!(ours == Aligned(bytes));
        assert!(Aligned([0; SHORT_ARGS]) == Aligned([0; SHORT_ARGS]));
        for at in 0..SHORT_ARGS {
            for bit in 0..8 {
                let mut theirs = bytes;
                theirs[at] ^= 1 << bit;
                assert!(ours != Aligned(theirs), "byte {at}, bit {bit} not compared");
                assert!(Aligned(theirs) != ours);
            }
        }
    }

    #[test]
    #[allow(clippy::needless_borrow)] // The borrow picks the trait, as in generated code.
    fn short_keys_of_several_values_match_and_give_way_when_they_do_not_fit() {
        use crate::function::{Arg, OtherShortArg as _, ShortArg as _};
        // Several kinds together, in order.
        let (a, b, c, d) = (3u8, -4i64, f64::NAN, 'z');
        let (short, hashed) = short_and_hashed(
            |s| {
                (&Arg(&a)).short_into(s);
                (&Arg(&b)).short_into(s);
                (&Arg(&c)).short_into(s);
                (&Arg(&d)).short_into(s);
            },
            |h| {
                h.arg(&a);
                h.arg(&b);
                h.arg(&c);
                h.arg(&d);
            },
        );
        same_key(short, hashed, "u8, i64, f64, char");
        // No arguments at all.
        let (short, hashed) = short_and_hashed(|_| {}, |_| {});
        same_key(short, hashed, "no arguments");
        // 48 bytes fit (four `u64`s, 10 bytes each, and two `u16`s, 4 each); 49 do not (four
        // `u64`s, a `u32` and a `u8`), and the hasher's key is then the hashed form.
        let four_u64s_and = |write: &dyn Fn(&mut ShortArgs), hash: &dyn Fn(&mut ArgsHasher)| {
            short_and_hashed(
                |s| {
                    for x in 0..4u64 {
                        (&Arg(&x)).short_into(s);
                    }
                    write(s);
                },
                |h| {
                    (0..4u64).for_each(|x| h.arg(&x));
                    hash(h);
                },
            )
        };
        let (short, hashed) = four_u64s_and(
            &|s| {
                (&Arg(&7u16)).short_into(s);
                (&Arg(&8u16)).short_into(s);
            },
            &|h| {
                h.arg(&7u16);
                h.arg(&8u16);
            },
        );
        assert_eq!(hashed.short_args().map(<[u8]>::len), Some(48));
        same_key(short, hashed, "48 bytes");
        let (short, hashed) = four_u64s_and(
            &|s| {
                (&Arg(&7u32)).short_into(s);
                (&Arg(&8u8)).short_into(s);
            },
            &|h| {
                h.arg(&7u32);
                h.arg(&8u8);
            },
        );
        assert!(short.is_none() && hashed.short_args().is_none(), "49 bytes");
        // A parameter of another type sends the call through the hasher.
        let text = String::from("x");
        let (short, _) = short_and_hashed(
            |s| {
                (&Arg(&1u64)).short_into(s);
                (&Arg(&text)).short_into(s);
            },
            |_| {},
        );
        assert!(short.is_none(), "a String");
    }
}
