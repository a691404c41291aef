//! Ask once, share the answer: concurrent callers that want the same key
//! join the flight already in progress instead of starting another.
//!
//! One mechanism serves the read-through fetches, the existence cache's
//! questions and the action-cache lookups. Its invariants:
//! - A flight is spawned (through [`Background`]), so a caller that gives up
//!   never cancels it for the others; it runs to its end with no caller left.
//! - A key is in flight from the claim that starts it until the flight ends,
//!   also when shutdown cancels it or it panics; the next claim after that
//!   starts a new flight.
//! - Every caller sees the one result through an `Arc`; a failure is copied
//!   for each with [`Error::duplicate`], so `Error` need not be `Clone`.
//! - One flight may answer several keys (a batched read, one FindMissingBlobs
//!   question): it returns one result per key, in order.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};
use tracing::Instrument;

use crate::error::{Error, Result, duplicate, each_fails};
use crate::tasks::Background;

/// The shared outcome of one flight: a result per key it answers.
type Group<V> = Shared<BoxFuture<'static, Arc<Vec<Result<V>>>>>;

/// Flights in progress, by key.
type Flights<K, V> = Arc<Mutex<HashMap<K, Seat<V>>>>;

/// Shares work in progress by key.
pub struct SingleFlight<K, V> {
    /// The flight answering each key in progress, and the key's place in it.
    flights: Flights<K, V>,
    /// Where flights are spawned, so shutdown can cancel and drain them.
    background: Background,
}

/// One key's place in a flight.
struct Seat<V> {
    group: Group<V>,
    index: usize,
}

impl<V> Clone for Seat<V> {
    fn clone(&self) -> Self {
        Seat {
            group: self.group.clone(),
            index: self.index,
        }
    }
}

/// How a claim got its flight (callers count joins differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This claim started the flight.
    Started,
    /// The flight was already in progress (another caller started it).
    Joined,
    /// The key appeared earlier in the same claim; it shares that flight.
    Repeated,
}

/// A claim on one key's result.
pub struct Ticket<V> {
    seat: Seat<V>,
    role: Role,
}

impl<V: Clone> Ticket<V> {
    /// How this claim got its flight.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Waits for the flight to land and returns this key's result.
    pub async fn wait(self) -> Result<V> {
        let all = self.seat.group.await;
        duplicate(&all[self.seat.index])
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// No flights yet; new ones are spawned on `background`.
    pub fn new(background: Background) -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
            background,
        }
    }

    /// One ticket per key: keys in flight are joined; the others are answered
    /// by one new flight, `start(new_keys)`, which returns a result per key.
    pub fn claim<F, Fut>(&self, keys: &[K], start: F) -> Vec<Ticket<V>>
    where
        F: FnOnce(Vec<K>) -> Fut,
        Fut: Future<Output = Vec<Result<V>>> + Send + 'static,
    {
        let mut flights = self.lock();
        // Per key: a joined seat, or its index among the new keys.
        let mut places: Vec<Result<Seat<V>, (usize, Role)>> = Vec::with_capacity(keys.len());
        let mut new_keys: Vec<K> = Vec::new();
        let mut new_index: HashMap<&K, usize> = HashMap::new();
        for key in keys {
            if let Some(seat) = flights.get(key) {
                places.push(Ok(seat.clone()));
            } else if let Some(&index) = new_index.get(key) {
                places.push(Err((index, Role::Repeated)));
            } else {
                new_index.insert(key, new_keys.len());
                places.push(Err((new_keys.len(), Role::Started)));
                new_keys.push(key.clone());
            }
        }
        let group = (!new_keys.is_empty()).then(|| {
            let group = self.spawn(new_keys.clone(), start(new_keys.clone()));
            for (index, key) in new_keys.into_iter().enumerate() {
                let seat = Seat {
                    group: group.clone(),
                    index,
                };
                flights.insert(key, seat);
            }
            group
        });
        drop(flights);
        places
            .into_iter()
            .map(|place| match place {
                Ok(seat) => Ticket {
                    seat,
                    role: Role::Joined,
                },
                Err((index, role)) => Ticket {
                    seat: Seat {
                        group: group.clone().expect("new keys have a flight"),
                        index,
                    },
                    role,
                },
            })
            .collect()
    }

    /// The result for one key: joins its flight or starts `start()` as one.
    pub async fn run<Fut>(&self, key: K, start: impl FnOnce() -> Fut) -> Result<V>
    where
        Fut: Future<Output = Result<V>> + Send + 'static,
        V: Clone,
    {
        let mut tickets = self.claim(std::slice::from_ref(&key), |_| {
            let work = start();
            async move { vec![work.await] }
        });
        tickets.pop().expect("one ticket per key").wait().await
    }

    /// Spawns `work` answering `keys`; the keys leave the table when it ends
    /// however it ends. Called with the table locked, so the keys are in the
    /// table before the flight can remove them.
    fn spawn<Fut>(&self, keys: Vec<K>, work: Fut) -> Group<V>
    where
        Fut: Future<Output = Vec<Result<V>>> + Send + 'static,
    {
        let count = keys.len();
        let landing = Landing {
            flights: self.flights.clone(),
            keys,
        };
        // Logged under the span of the request that started the flight.
        let task = self.background.spawn(
            async move {
                let _landing = landing;
                work.await
            }
            .instrument(tracing::Span::current()),
        );
        async move {
            let results = match task.await {
                Ok(Some(results)) if results.len() == count => results,
                Ok(Some(results)) => each_fails(
                    &Error::Internal(format!(
                        "a flight returned {} results for {count} keys",
                        results.len()
                    )),
                    count,
                ),
                Ok(None) => each_fails(
                    &Error::Unavailable("shutting down: transfer cancelled".into()),
                    count,
                ),
                Err(e) => each_fails(&Error::Internal(format!("flight failed: {e}")), count),
            };
            Arc::new(results)
        }
        .boxed()
        .shared()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Seat<V>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Frees a flight's keys when the flight ends (dropped with its task, so
/// also on cancellation and panic).
struct Landing<K: Eq + Hash, V> {
    flights: Flights<K, V>,
    keys: Vec<K>,
}

impl<K: Eq + Hash, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        for key in &self.keys {
            flights.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn counted(calls: &Arc<AtomicUsize>, value: u32) -> impl Future<Output = Result<u32>> + use<> {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(value)
        }
    }

    #[tokio::test]
    async fn joiners_share_one_call() {
        let flights = Arc::new(SingleFlight::<u32, u32>::new(Background::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let (flights, calls) = (flights.clone(), calls.clone());
                tokio::spawn(async move { flights.run(1, || counted(&calls, 7)).await })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failing_flight_reports_to_every_joiner() {
        let flights = SingleFlight::<u32, u32>::new(Background::new());
        let first = flights.claim(&[1, 2], |_| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            vec![Err(Error::NotFound("one".into())), Ok(2)]
        });
        let joined = flights.claim(&[1, 1], |_| async { unreachable!() });
        assert!(joined.iter().all(|t| t.role() == Role::Joined));
        let roles: Vec<Role> = first.iter().map(Ticket::role).collect();
        assert_eq!(roles, [Role::Started, Role::Started]);
        for ticket in joined {
            let err = ticket.wait().await.unwrap_err();
            assert!(matches!(&err, Error::NotFound(m) if m == "one"), "{err:?}");
        }
        let mut first = first.into_iter();
        assert!(matches!(
            first.next().unwrap().wait().await,
            Err(Error::NotFound(_))
        ));
        assert_eq!(first.next().unwrap().wait().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_key_repeated_in_one_claim_shares_its_flight() {
        let flights = SingleFlight::<u32, u32>::new(Background::new());
        let tickets = flights.claim(
            &[5, 5],
            |keys| async move { keys.into_iter().map(Ok).collect() },
        );
        let roles: Vec<Role> = tickets.iter().map(Ticket::role).collect();
        assert_eq!(roles, [Role::Started, Role::Repeated]);
        for ticket in tickets {
            assert_eq!(ticket.wait().await.unwrap(), 5);
        }
    }

    #[tokio::test]
    async fn the_key_is_free_again_after_the_flight() {
        let flights = SingleFlight::<u32, u32>::new(Background::new());
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(flights.run(1, || counted(&calls, 1)).await.unwrap(), 1);
        assert_eq!(flights.run(1, || counted(&calls, 2)).await.unwrap(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_cancel_the_flight() {
        let flights = SingleFlight::<u32, u32>::new(Background::new());
        let finished = Arc::new(AtomicUsize::new(0));
        let done = finished.clone();
        let abandoned = flights.run(1, move || async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        });
        // Give up before the flight lands.
        let _ = tokio::time::timeout(Duration::from_millis(5), abandoned).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert!(flights.lock().is_empty(), "the key was freed");
    }

    #[tokio::test]
    async fn shutdown_cancels_a_flight_and_frees_its_key() {
        let background = Background::new();
        let flights = SingleFlight::<u32, u32>::new(background.clone());
        let ticket = flights
            .claim(&[1], |_| async {
                std::future::pending::<()>().await;
                vec![Ok(1)]
            })
            .pop()
            .unwrap();
        assert_eq!(background.shutdown(Duration::from_secs(5)).await, 0);
        assert!(matches!(ticket.wait().await, Err(Error::Unavailable(_))));
        assert!(flights.lock().is_empty());
    }
}
