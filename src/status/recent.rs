//! A bounded map that forgets the least recently seen key: the client
//! activity and error tables key on what clients send (tool names,
//! invocation ids, method paths), so they must not grow without bound.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::time::Instant;

use lru::LruCache;

/// At most `capacity` entries; inserting one more evicts the entry seen
/// longest ago (in O(1): every call of every client passes through here).
pub struct Recent<K: Hash + Eq, V> {
    entries: LruCache<K, Seen<V>>,
}

/// A value and when its key was last seen.
pub struct Seen<V> {
    /// The value.
    pub value: V,
    /// The key's last [`Recent::touch`].
    pub last_seen: Instant,
}

impl<K: Eq + Hash + Clone, V: Default> Recent<K, V> {
    /// An empty table of at most `capacity` (≥ 1) entries.
    pub fn new(capacity: usize) -> Self {
        Recent {
            entries: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// The value of `key` (a default one if new, evicting the least recently
    /// seen entry when full), marked seen at `now`. The key is cloned only
    /// when it is new.
    pub fn touch(&mut self, key: &K, now: Instant) -> &mut V {
        if !self.entries.contains(key) {
            self.entries.push(
                key.clone(),
                Seen {
                    value: V::default(),
                    last_seen: now,
                },
            );
        }
        let seen = self
            .entries
            .get_mut(key)
            .expect("the key was just looked up or inserted");
        seen.last_seen = now;
        &mut seen.value
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Seen<V>)> {
        self.entries.iter()
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_table_forgets_the_key_seen_longest_ago() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut table: Recent<&str, u64> = Recent::new(2);
        *table.touch(&"a", at(0)) += 1;
        *table.touch(&"b", at(1)) += 1;
        *table.touch(&"a", at(2)) += 1;
        *table.touch(&"c", at(3)) += 1;
        assert_eq!(table.len(), 2);
        let mut keys: Vec<_> = table.iter().map(|(k, s)| (*k, s.value)).collect();
        keys.sort();
        assert_eq!(keys, [("a", 2), ("c", 1)]);
    }
}
