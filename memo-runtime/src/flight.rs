//! In-process single flight: when several threads miss on one key at once, one computes and the
//! others wait for its result instead of computing it again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::{self, ThreadId};

use crate::key::CacheKey;

/// The encoded payload a finished computation hands to its waiters.
pub(crate) type Payload = Arc<Vec<u8>>;

enum State {
    Running,
    /// Finished; the payload is `None` when the value could not be encoded.
    Done(Option<Payload>),
    /// The computing thread panicked.
    Abandoned,
}

struct Flight {
    owner: ThreadId,
    state: Mutex<State>,
    finished: Condvar,
    /// Threads waiting on `finished` (changed while holding `state`): without any, finishing
    /// wakes no one, which saves a system call per miss.
    sleepers: AtomicUsize,
    /// Tasks of `async` callers waiting for it; registered while holding `state`.
    wakers: Mutex<Vec<Waker>>,
}

/// The keys being computed in this process right now.
#[derive(Default)]
pub(crate) struct InFlight {
    flights: Mutex<Flights>,
}

#[derive(Default)]
struct Flights {
    running: HashMap<CacheKey, Arc<Flight>, rustc_hash::FxBuildHasher>,
    /// The threads waiting for a flight, each with the thread that owns it.
    waiting: HashMap<ThreadId, ThreadId, rustc_hash::FxBuildHasher>,
}

impl Flights {
    /// Whether `thread` is `me`, or waits (through others) for a flight that `me` owns: then
    /// `me` waiting for a flight of `thread` would close a circle in which no one ever wakes.
    /// (Work-stealing pools make one: a thread computing a key runs, while it waits for its
    /// parallel parts, another item's call that waits for a key of a second thread, which did
    /// the same the other way round.)
    fn leads_to(&self, mut thread: ThreadId, me: ThreadId) -> bool {
        // Bounded: the waits recorded form no circle (none is let in), but be sure.
        for _ in 0..=self.waiting.len() {
            if thread == me {
                return true;
            }
            match self.waiting.get(&thread) {
                Some(&owner) => thread = owner,
                None => return false,
            }
        }
        false
    }
}

/// The outcome of [`InFlight::claim`].
pub(crate) enum Claim<'a> {
    /// This thread computes the key; it must call [`FlightGuard::finish`].
    Owner(FlightGuard<'a>),
    /// Another thread computed the key; its payload, if it could be encoded. `None` also when
    /// that thread panicked: look again, then compute.
    Waited(Option<Payload>),
    /// This thread is already computing this key further up its stack (a function that calls
    /// itself with the same arguments), or the key's owner waits, directly or through other
    /// threads, for a key this thread computes: waiting would deadlock, so compute directly.
    Reentrant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave their data inconsistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InFlight {
    pub(crate) fn claim(&self, key: CacheKey) -> Claim<'_> {
        let me = thread::current().id();
        let flight = {
            let mut flights = lock(&self.flights);
            match flights.running.get(&key) {
                Some(flight) if flights.leads_to(flight.owner, me) => return Claim::Reentrant,
                Some(flight) => {
                    let flight = Arc::clone(flight);
                    flights.waiting.insert(me, flight.owner);
                    flight
                }
                None => {
                    let flight = Arc::new(Flight {
                        owner: me,
                        state: Mutex::new(State::Running),
                        finished: Condvar::new(),
                        sleepers: AtomicUsize::new(0),
                        wakers: Mutex::new(Vec::new()),
                    });
                    flights.running.insert(key, Arc::clone(&flight));
                    return Claim::Owner(FlightGuard {
                        set: self,
                        key,
                        flight,
                        finished: false,
                    });
                }
            }
        };
        let payload = flight.wait();
        lock(&self.flights).waiting.remove(&me);
        Claim::Waited(payload)
    }
}

impl Flight {
    /// Waits for the flight to end: its payload, or `None` (not encoded, or the owner panicked).
    fn wait(&self) -> Option<Payload> {
        let mut state = lock(&self.state);
        loop {
            match &*state {
                State::Running => {
                    self.sleepers.fetch_add(1, Ordering::SeqCst);
                    state = self
                        .finished
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                    self.sleepers.fetch_sub(1, Ordering::SeqCst);
                }
                State::Done(payload) => return payload.clone(),
                State::Abandoned => return None,
            }
        }
    }
}

/// The outcome of [`InFlight::claim_async`].
pub(crate) enum AsyncClaim<'a> {
    /// This task computes the key; it must call [`FlightGuard::finish`].
    Owner(FlightGuard<'a>),
    /// Another caller computes it: await its payload (`None`: look again, then compute).
    Wait(FlightWait),
}

impl InFlight {
    /// [`InFlight::claim`] for `async` callers: waiting is a future, never a blocked thread. A
    /// task has no thread of its own, so there is no re-entrance check.
    pub(crate) fn claim_async(&self, key: CacheKey) -> AsyncClaim<'_> {
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.running.get(&key) {
            return AsyncClaim::Wait(FlightWait {
                flight: Arc::clone(flight),
            });
        }
        let flight = Arc::new(Flight {
            owner: thread::current().id(),
            state: Mutex::new(State::Running),
            finished: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            wakers: Mutex::new(Vec::new()),
        });
        flights.running.insert(key, Arc::clone(&flight));
        AsyncClaim::Owner(FlightGuard {
            set: self,
            key,
            flight,
            finished: false,
        })
    }
}

/// Resolves when a flight finishes, with its payload.
pub(crate) struct FlightWait {
    flight: Arc<Flight>,
}

impl Future for FlightWait {
    type Output = Option<Payload>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Payload>> {
        let state = lock(&self.flight.state);
        match &*state {
            // Registered while `state` is held: `settle` sets the state first, then wakes, so the
            // wake-up cannot be missed.
            State::Running => {
                lock(&self.flight.wakers).push(cx.waker().clone());
                Poll::Pending
            }
            State::Done(payload) => Poll::Ready(payload.clone()),
            State::Abandoned => Poll::Ready(None),
        }
    }
}

/// Held by the thread computing a key; wakes the waiters when finished or dropped (a panic).
pub(crate) struct FlightGuard<'a> {
    set: &'a InFlight,
    key: CacheKey,
    flight: Arc<Flight>,
    finished: bool,
}

impl FlightGuard<'_> {
    pub(crate) fn finish(mut self, payload: Option<Payload>) {
        self.finished = true;
        self.settle(State::Done(payload));
    }

    fn settle(&self, outcome: State) {
        lock(&self.set.flights).running.remove(&self.key);
        *lock(&self.flight.state) = outcome;
        // A sleeper counted itself while holding `state`, before this thread set it: seen here.
        if self.flight.sleepers.load(Ordering::SeqCst) > 0 {
            self.flight.finished.notify_all();
        }
        let wakers = std::mem::take(&mut *lock(&self.flight.wakers));
        for waker in wakers {
            waker.wake();
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.settle(State::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn one_owner_and_waiters_get_its_payload() {
        let set = InFlight::default();
        let key = CacheKey::from_bytes([1; 32]);
        let owners = AtomicUsize::new(0);
        let received = AtomicUsize::new(0);
        thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| match set.claim(key) {
                    Claim::Owner(guard) => {
                        owners.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(100));
                        guard.finish(Some(Arc::new(b"value".to_vec())));
                    }
                    Claim::Waited(Some(payload)) => {
                        assert_eq!(&*payload, b"value");
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                    // A thread that arrives after the owner finished becomes an owner itself.
                    Claim::Waited(None) | Claim::Reentrant => panic!("unexpected claim"),
                });
            }
        });
        let owners = owners.load(Ordering::SeqCst);
        assert!(owners >= 1);
        assert_eq!(owners + received.load(Ordering::SeqCst), 8);
    }

    #[test]
    fn a_panicking_owner_releases_waiters() {
        let set = InFlight::default();
        let key = CacheKey::from_bytes([2; 32]);
        let guard = match set.claim(key) {
            Claim::Owner(guard) => guard,
            _ => panic!("first claim must own"),
        };
        thread::scope(|scope| {
            let waiter = scope.spawn(|| matches!(set.claim(key), Claim::Waited(None)));
            thread::sleep(Duration::from_millis(50));
            drop(guard); // as during unwinding
            assert!(waiter.join().unwrap());
        });
        assert!(matches!(set.claim(key), Claim::Owner(_)));
    }

    #[test]
    fn threads_waiting_for_each_others_keys_do_not_deadlock() {
        // On threads of their own: a deadlock fails the test instead of hanging it.
        let (ended, end) = std::sync::mpsc::channel();
        thread::spawn(move || {
            circle_of_two_waits();
            ended.send(()).unwrap();
        });
        end.recv_timeout(Duration::from_secs(30))
            .expect("two threads waiting for each other's keys deadlocked");
    }

    fn circle_of_two_waits() {
        let set = InFlight::default();
        let (first, second) = (CacheKey::from_bytes([4; 32]), CacheKey::from_bytes([5; 32]));
        let owner = |key| match set.claim(key) {
            Claim::Owner(guard) => guard,
            _ => panic!("first claim must own"),
        };
        let mine = owner(first);
        let me = thread::current().id();
        let (owns, owned) = std::sync::mpsc::channel();
        let (set, owner) = (&set, &owner);
        thread::scope(|scope| {
            let other = scope.spawn(move || {
                let theirs = owner(second);
                owns.send(()).unwrap();
                // Once the main thread waits for `second`, waiting for `first` would close a
                // circle: this thread is told to compute instead.
                while !lock(&set.flights).waiting.contains_key(&me) {
                    thread::sleep(Duration::from_millis(1));
                }
                let told = matches!(set.claim(first), Claim::Reentrant);
                theirs.finish(Some(Arc::new(b"second".to_vec())));
                told
            });
            owned.recv().unwrap();
            match set.claim(second) {
                Claim::Waited(Some(payload)) => assert_eq!(&*payload, b"second"),
                _ => panic!("the other thread owned it"),
            }
            assert!(other.join().unwrap());
        });
        mine.finish(None);
        assert!(lock(&set.flights).waiting.is_empty());
        assert!(lock(&set.flights).running.is_empty());
    }

    #[test]
    fn the_same_thread_is_told_it_reenters() {
        let set = InFlight::default();
        let key = CacheKey::from_bytes([3; 32]);
        let _guard = match set.claim(key) {
            Claim::Owner(guard) => guard,
            _ => panic!("first claim must own"),
        };
        assert!(matches!(set.claim(key), Claim::Reentrant));
    }
}
