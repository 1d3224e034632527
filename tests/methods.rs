//! `#[cached]` in `impl` blocks: methods keyed on their receiver, `ignore(self)`, associated
//! functions, trait impls, and two types with same-named functions.

mod common;

use std::sync::LazyLock;

use common::{fresh_dir, Counter};
use memo::prelude::*;
use serde::{Deserialize, Serialize};

static MEMORY: LazyLock<Memory> = LazyLock::new(|| Memory::new(fresh_dir("methods")));

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Model {
    weights: Vec<f64>,
}

static PREDICT: Counter = Counter::new();
static CONSTANT: Counter = Counter::new();
static SEEDED: Counter = Counter::new();
static DESCRIBE: Counter = Counter::new();
static CONSUME: Counter = Counter::new();
static PARALLEL: Counter = Counter::new();

impl Model {
    /// The receiver is part of the key.
    #[cached(memory = MEMORY)]
    fn predict(&self, x: f64) -> f64 {
        PREDICT.bump();
        self.weights.iter().map(|w| w * x).sum()
    }

    #[cached(memory = MEMORY, ignore(self))]
    fn constant(&self, x: u64) -> u64 {
        CONSTANT.bump();
        x + 1
    }

    /// An associated function that mentions `Self`.
    #[cached(memory = MEMORY)]
    fn from_seed(seed: u64) -> Self {
        SEEDED.bump();
        Model {
            weights: vec![seed as f64; 3],
        }
    }

    /// One that mentions neither `self` nor `Self` says it is associated.
    #[cached(memory = MEMORY, associated)]
    fn describe(n: u32) -> String {
        DESCRIBE.bump();
        format!("model #{n}")
    }

    /// `predict` again, for the parallel test (tests run at once; each counts its own calls).
    #[cached(memory = MEMORY)]
    fn predict_in_parallel(&self, x: f64) -> f64 {
        PARALLEL.bump();
        self.weights.iter().map(|w| w * x).sum()
    }

    #[cached(memory = MEMORY)]
    fn consume(self) -> usize {
        CONSUME.bump();
        self.weights.len()
    }
}

#[test]
fn methods_are_keyed_on_their_receiver() {
    let a = Model {
        weights: vec![1.0, 2.0],
    };
    let b = Model { weights: vec![3.0] };
    assert_eq!(a.predict(2.0), 6.0);
    assert_eq!(a.clone().predict(2.0), 6.0);
    assert_eq!(PREDICT.get(), 1, "an equal receiver is a hit");
    assert_eq!(b.predict(2.0), 6.0);
    assert_eq!(PREDICT.get(), 2, "another receiver is another key");
    assert_eq!(a.clone().consume(), 2);
    assert_eq!(a.consume(), 2);
    assert_eq!(CONSUME.get(), 1, "`self` by value is keyed too");
}

#[test]
fn ignore_self_shares_entries_across_receivers() {
    let a = Model { weights: vec![1.0] };
    let b = Model { weights: vec![9.0] };
    assert_eq!(a.constant(4), 5);
    assert_eq!(b.constant(4), 5);
    assert_eq!(CONSTANT.get(), 1);
}

#[test]
fn associated_functions_work() {
    assert_eq!(Model::from_seed(2), Model::from_seed(2));
    assert_eq!(SEEDED.get(), 1);
    assert_eq!(Model::describe(3), "model #3");
    assert_eq!(Model::describe(3), "model #3");
    assert_eq!(DESCRIBE.get(), 1);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Other {
    seed: u64,
}

static OTHER_SEEDED: Counter = Counter::new();

impl Other {
    /// Same module, same name, same argument as `Model::from_seed`: never the same entry.
    #[cached(memory = MEMORY)]
    fn from_seed(seed: u64) -> Self {
        OTHER_SEEDED.bump();
        Other { seed }
    }
}

#[test]
fn same_named_functions_of_two_types_never_share_entries() {
    assert_eq!(Model::from_seed(7).weights, vec![7.0; 3]);
    assert_eq!(Other::from_seed(7), Other { seed: 7 });
    assert_eq!(Other::from_seed(7), Other { seed: 7 });
    assert_eq!(OTHER_SEEDED.get(), 1);
}

trait Score {
    fn score(&self, x: u64) -> u64;
}

static SCORE: Counter = Counter::new();

impl Score for Model {
    #[cached(memory = MEMORY)]
    fn score(&self, x: u64) -> u64 {
        SCORE.bump();
        x * self.weights.len() as u64
    }
}

#[test]
fn trait_impl_methods_work() {
    let model = Model {
        weights: vec![1.0, 1.0],
    };
    assert_eq!(model.score(5), 10);
    assert_eq!(model.score(5), 10);
    assert_eq!(SCORE.get(), 1);
    let as_trait: &dyn Score = &model;
    assert_eq!(as_trait.score(5), 10);
    assert_eq!(SCORE.get(), 1);
}

#[test]
fn methods_map_in_parallel() {
    let model = Model { weights: vec![0.5] };
    let results: Vec<f64> = (0..20u32)
        .map(f64::from)
        .par_cached_map(|x| model.predict_in_parallel(x))
        .collect();
    assert_eq!(
        results,
        (0..20).map(|x| f64::from(x) * 0.5).collect::<Vec<_>>()
    );
    assert_eq!(PARALLEL.get(), 20);
}

/// A unit to convert metres to, by its factor.
trait Unit {
    const PER_METRE: f64;
}

struct Metres;
struct Feet;

impl Unit for Metres {
    const PER_METRE: f64 = 1.0;
}

impl Unit for Feet {
    const PER_METRE: f64 = 3.28084;
}

trait Convert<U> {
    fn convert(metres: f64) -> f64;
}

static CONVERTED: Counter = Counter::new();

/// One impl for every unit: the attribute sees neither `U` nor the trait's parameters.
impl<U: Unit> Convert<U> for Model {
    #[cached(memory = MEMORY, associated)]
    fn convert(metres: f64) -> f64 {
        CONVERTED.bump();
        metres * U::PER_METRE
    }
}

#[test]
fn each_instance_of_a_generic_impl_has_its_own_entries() {
    assert_eq!(<Model as Convert<Metres>>::convert(2.0), 2.0);
    assert_eq!(<Model as Convert<Feet>>::convert(2.0), 6.56168);
    assert_eq!(<Model as Convert<Metres>>::convert(2.0), 2.0);
    assert_eq!(<Model as Convert<Feet>>::convert(2.0), 6.56168);
    assert_eq!(CONVERTED.get(), 2);
}
