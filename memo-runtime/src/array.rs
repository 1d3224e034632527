//! [`Array`]: a large array of numbers that a cache hit serves straight from the entry file.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::key::Number;

/// A read-only array of primitive numbers (`f64`, `f32`, the integers up to 64 bits) that a cache
/// hit serves without copying: the entry file is memory-mapped and the array reads from the
/// mapping, like joblib's `mmap_mode="r"` for numpy arrays. Return it instead of a `Vec` from a
/// `#[cached]` function whose results are large (`fn signal(n: usize) -> memo::Array<f64>`; the
/// README shows it whole). Build one from a `Vec` or an iterator:
///
/// ```
/// use memo_runtime::Array;
///
/// let values: Array<f64> = (0..1000).map(|i| (i as f64).sin()).collect();
/// let total: f64 = values.iter().sum(); // derefs to &[f64]
/// assert!(!values.is_mapped());
/// assert_eq!(Array::from(vec![1u32, 2]).into_vec(), vec![1, 2]);
/// # let _ = total;
/// ```
///
/// It derefs to `&[N]`; [`Array::into_vec`] gives a `Vec` (a copy when mapped). Entries of at
/// least 4 MiB are mapped (smaller ones are read into memory, which is as fast for them), when
/// they are not compressed. The values are the same either way: the entry's checksum is
/// verified before the array is returned.
///
/// A mapped array keeps its entry file open while it lives; memo never changes an entry file
/// in place, so removing or recomputing the entry meanwhile does not change the array. (Only a
/// program outside memo that truncates the file could make reading the array fault.)
#[derive(Clone)]
pub struct Array<N> {
    repr: Repr<N>,
}

#[derive(Clone)]
enum Repr<N> {
    Owned(Vec<N>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        bytes: Range<usize>,
        _numbers: std::marker::PhantomData<N>,
    },
}

impl<N: Number> Array<N> {
    /// An array over `bytes` of `map`: `None` unless they are a whole number of aligned `N`.
    pub(crate) fn mapped(map: Arc<memmap2::Mmap>, bytes: Range<usize>) -> Option<Self> {
        let slice = map.get(bytes.clone())?;
        bytemuck::try_cast_slice::<u8, N>(slice).ok()?;
        Some(Array {
            repr: Repr::Mapped {
                map,
                bytes,
                _numbers: std::marker::PhantomData,
            },
        })
    }

    /// Whether the values are read from a mapped entry file (a hit on a large entry), rather
    /// than held in memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, Repr::Mapped { .. })
    }

    /// The values as a `Vec`: moved out when held in memory, copied when mapped.
    pub fn into_vec(self) -> Vec<N> {
        match self.repr {
            Repr::Owned(values) => values,
            Repr::Mapped { .. } => self.to_vec(),
        }
    }
}

impl<N: Number> Deref for Array<N> {
    type Target = [N];

    fn deref(&self) -> &[N] {
        match &self.repr {
            Repr::Owned(values) => values,
            // Checked to cast when the array was made; the mapping does not move.
            Repr::Mapped { map, bytes, .. } => bytemuck::cast_slice(&map[bytes.clone()]),
        }
    }
}

impl<N: Number> From<Vec<N>> for Array<N> {
    fn from(values: Vec<N>) -> Self {
        Array {
            repr: Repr::Owned(values),
        }
    }
}

impl<N: Number> FromIterator<N> for Array<N> {
    fn from_iter<I: IntoIterator<Item = N>>(iter: I) -> Self {
        Array::from(iter.into_iter().collect::<Vec<N>>())
    }
}

impl<N: Number> Default for Array<N> {
    fn default() -> Self {
        Array::from(Vec::new())
    }
}

impl<N: Number + fmt::Debug> fmt::Debug for Array<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<N: Number + PartialEq> PartialEq for Array<N> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

/// Serialized as a sequence, like a `Vec<N>`.
impl<N: Number + Serialize> Serialize for Array<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self[..].serialize(serializer)
    }
}

impl<'de, N: Number + Deserialize<'de>> Deserialize<'de> for Array<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<N>::deserialize(deserializer).map(Array::from)
    }
}
