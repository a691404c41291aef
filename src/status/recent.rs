//! A bounded map that forgets the least recently seen key: the client
//! activity and error tables key on what clients send (tool names,
//! invocation ids, method paths), so they must not grow without bound.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// At most `capacity` entries; inserting one more evicts the entry seen
/// longest ago.
pub struct Recent<K, V> {
    capacity: usize,
    entries: HashMap<K, Seen<V>>,
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
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    /// The value of `key` (a default one if new, evicting the least recently
    /// seen entry when full), marked seen at `now`.
    pub fn touch(&mut self, key: K, now: Instant) -> &mut V {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, seen)| seen.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        let seen = self.entries.entry(key).or_insert_with(|| Seen {
            value: V::default(),
            last_seen: now,
        });
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
        *table.touch("a", at(0)) += 1;
        *table.touch("b", at(1)) += 1;
        *table.touch("a", at(2)) += 1;
        *table.touch("c", at(3)) += 1;
        assert_eq!(table.len(), 2);
        let mut keys: Vec<_> = table.iter().map(|(k, s)| (*k, s.value)).collect();
        keys.sort();
        assert_eq!(keys, [("a", 2), ("c", 1)]);
    }
}
