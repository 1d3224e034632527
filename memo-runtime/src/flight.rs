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

/// What waiters of a key wait on: made by the first of them (a key nobody waits for, the usual
/// case, costs no allocation and no locking of its own).
struct Flight {
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

/// A key being computed: by which thread, and what its waiters wait on, once there are any.
struct Running {
    owner: ThreadId,
    flight: Option<Arc<Flight>>,
}

impl Running {
    /// What a new waiter waits on.
    fn flight(&mut self) -> Arc<Flight> {
        Arc::clone(self.flight.get_or_insert_with(|| {
            Arc::new(Flight {
                state: Mutex::new(State::Running),
                finished: Condvar::new(),
                sleepers: AtomicUsize::new(0),
                wakers: Mutex::new(Vec::new()),
            })
        }))
    }
}

#[derive(Default)]
struct Flights {
    running: HashMap<CacheKey, Running, rustc_hash::FxBuildHasher>,
    /// The threads waiting for a flight.
    waiting: Waiting,
}

/// The threads waiting for a flight, each with the thread that owns it.
type Waiting = HashMap<ThreadId, ThreadId, rustc_hash::FxBuildHasher>;

/// Whether `thread` is `me`, or waits (through others) for a flight that `me` owns: then `me`
/// waiting for a flight of `thread` would close a circle in which no one ever wakes.
/// (Work-stealing pools make one: a thread computing a key runs, while it waits for its parallel
/// parts, another item's call that waits for a key of a second thread, which did the same the
/// other way round.)
fn leads_to(waiting: &Waiting, mut thread: ThreadId, me: ThreadId) -> bool {
    // Bounded: the waits recorded form no circle (none is let in), but be sure.
    for _ in 0..=waiting.len() {
        if thread == me {
            return true;
        }
        match waiting.get(&thread) {
            Some(&owner) => thread = owner,
            None => return false,
        }
    }
    false
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

/// This thread's id, kept: `thread::current()` costs about 20 ns (it clones the thread's handle),
/// and every miss asks.
fn this_thread() -> ThreadId {
    thread_local! {
        static ID: ThreadId = thread::current().id();
    }
    ID.with(|id| *id)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave their data inconsistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InFlight {
    pub(crate) fn claim(&self, key: CacheKey) -> Claim<'_> {
        let me = this_thread();
        let flight = {
            let mut guard = lock(&self.flights);
            let Flights { running, waiting } = &mut *guard;
            match running.get_mut(&key) {
                Some(found) if leads_to(waiting, found.owner, me) => return Claim::Reentrant,
                Some(found) => {
                    waiting.insert(me, found.owner);
                    found.flight()
                }
                None => {
                    running.insert(
                        key,
                        Running {
                            owner: me,
                            flight: None,
                        },
                    );
                    return Claim::Owner(FlightGuard {
                        set: self,
                        key,
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
        if let Some(running) = flights.running.get_mut(&key) {
            return AsyncClaim::Wait(FlightWait {
                flight: running.flight(),
            });
        }
        let running = Running {
            owner: this_thread(),
            flight: None,
        };
        flights.running.insert(key, running);
        AsyncClaim::Owner(FlightGuard {
            set: self,
            key,
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
    finished: bool,
}

impl FlightGuard<'_> {
    pub(crate) fn finish(mut self, payload: Option<Payload>) {
        self.finished = true;
        self.settle(State::Done(payload));
    }

    fn settle(&self, outcome: State) {
        let running = lock(&self.set.flights).running.remove(&self.key);
        // Waiters made the flight while holding the lock just taken: after it, no new waiter
        // finds the key (it looks up the store, or claims the key for itself).
        let Some(flight) = running.and_then(|running| running.flight) else {
            return;
        };
        *lock(&flight.state) = outcome;
        // A sleeper counted itself while holding `state`, before this thread set it: seen here.
        if flight.sleepers.load(Ordering::SeqCst) > 0 {
            flight.finished.notify_all();
        }
        let wakers = std::mem::take(&mut *lock(&flight.wakers));
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
    fn a_flight_is_made_by_its_first_waiter_and_serves_every_waiter() {
        ends_in_time(
            waiters_share_a_flight_made_by_the_first,
            "the waiters were not woken with the owner's payload",
        );
    }

    /// Runs `test` on a thread of its own and fails with `stuck` when it has not ended within a
    /// minute: a waiter never woken fails the test instead of hanging it.
    fn ends_in_time(test: fn(), stuck: &str) {
        let (ended, end) = std::sync::mpsc::channel();
        thread::spawn(move || {
            test();
            ended.send(()).unwrap();
        });
        match end.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{stuck}"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the test's thread panicked (its message is above)")
            }
        }
    }

    fn waiters_share_a_flight_made_by_the_first() {
        let set = InFlight::default();
        let key = CacheKey::from_bytes([4; 32]);
        let flight_made = || {
            lock(&set.flights)
                .running
                .get(&key)
                .map(|r| r.flight.is_some())
        };
        let Claim::Owner(guard) = set.claim(key) else {
            panic!("the first claim owns the key");
        };
        // Nobody waits: nothing made.
        assert_eq!(flight_made(), Some(false));
        let (sent, received) = std::sync::mpsc::channel();
        thread::scope(|scope| {
            for _ in 0..3 {
                let sent = sent.clone();
                scope.spawn(|| {
                    let sent = sent;
                    match set.claim(key) {
                        Claim::Waited(payload) => sent.send(payload).unwrap(),
                        _ => panic!("a second claim waits"),
                    }
                });
            }
            // (A waiter that panics ends the waiting for its message at once.)
            drop(sent);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while lock(&set.flights).waiting.len() < 3 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the waiters never waited"
                );
                thread::yield_now();
            }
            assert_eq!(flight_made(), Some(true));
            guard.finish(Some(Arc::new(b"shared".to_vec())));
            for _ in 0..3 {
                let payload = received.recv().unwrap();
                assert_eq!(payload.as_deref().map(Vec::as_slice), Some(&b"shared"[..]));
            }
        });
        assert!(lock(&set.flights).running.is_empty());
        assert!(lock(&set.flights).waiting.is_empty());
    }

    /// The owner finishing between a waiter making the flight and waiting on it: the waiter,
    /// thread or task, finds the outcome.
    #[test]
    fn a_flight_finished_before_its_waiter_waits_still_serves_it() {
        ends_in_time(
            finished_before_waiting,
            "a waiter was not served by a flight that had finished",
        );
    }

    fn finished_before_waiting() {
        let set = InFlight::default();
        let key = CacheKey::from_bytes([5; 32]);
        let Claim::Owner(guard) = set.claim(key) else {
            panic!("the first claim owns the key");
        };
        let flight = lock(&set.flights)
            .running
            .get_mut(&key)
            .map(Running::flight);
        let AsyncClaim::Wait(mut task) = set.claim_async(key) else {
            panic!("a second claim waits");
        };
        guard.finish(Some(Arc::new(b"early".to_vec())));
        let payload = flight.expect("the key is running").wait();
        assert_eq!(payload.as_deref().map(Vec::as_slice), Some(&b"early"[..]));
        let mut context = Context::from_waker(Waker::noop());
        match Pin::new(&mut task).poll(&mut context) {
            Poll::Ready(payload) => {
                assert_eq!(payload.as_deref().map(Vec::as_slice), Some(&b"early"[..]));
            }
            Poll::Pending => panic!("the task waits for a flight that finished"),
        }
        assert!(lock(&set.flights).running.is_empty());
    }

    #[test]
    fn threads_waiting_for_each_others_keys_do_not_deadlock() {
        ends_in_time(
            circle_of_two_waits,
            "two threads waiting for each other's keys deadlocked",
        );
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
