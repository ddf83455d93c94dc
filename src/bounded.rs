//! Memory the relay keeps per row id or per exchange name, with a ceiling:
//! ids and names come from rows, and no sequence of rows may make the relay
//! remember without end. Past the ceiling the oldest entry is forgotten,
//! which only costs a repeated check or a row sent in a batch again.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::Hash,
};

use tokio::time::Instant;

/// A set that forgets its oldest members beyond `cap`.
#[derive(Debug)]
pub struct BoundedSet<T> {
    members: HashSet<T>,
    /// Insertion order; may still hold members removed since.
    order: VecDeque<T>,
    cap: usize,
}

impl<T: Hash + Eq + Clone> BoundedSet<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            members: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn insert(&mut self, value: T) {
        if !self.members.insert(value.clone()) {
            return;
        }
        self.order.push_back(value);
        while self.members.len() > self.cap {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.members.remove(&oldest);
                }
                None => break,
            }
        }
        // Removed members linger in `order`: sweep them before it outgrows
        // the set by much.
        if self.order.len() > 2 * self.cap {
            let members = &self.members;
            self.order.retain(|v| members.contains(v));
        }
    }

    pub fn remove(&mut self, value: &T) -> bool {
        self.members.remove(value)
    }

    pub fn contains(&self, value: &T) -> bool {
        self.members.contains(value)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.members.len()
    }
}

impl<T: Hash + Eq + Clone> Extend<T> for BoundedSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for value in iter {
            self.insert(value);
        }
    }
}

/// Keys valid until a deadline each, at most `cap` of them: expired keys go
/// first, then the one closest to its deadline.
#[derive(Debug)]
pub struct ExpiringMap<K> {
    until: HashMap<K, Instant>,
    cap: usize,
}

impl<K: Hash + Eq + Clone> ExpiringMap<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            until: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Whether `key` is in the map and its deadline has not passed.
    pub fn is_live(&self, key: &K) -> bool {
        self.until
            .get(key)
            .is_some_and(|until| Instant::now() < *until)
    }

    pub fn insert(&mut self, key: K, until: Instant) {
        if self.until.len() >= self.cap && !self.until.contains_key(&key) {
            let now = Instant::now();
            self.until.retain(|_, until| now < *until);
            if self.until.len() >= self.cap {
                let soonest = self
                    .until
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(k, _)| k.clone());
                if let Some(soonest) = soonest {
                    self.until.remove(&soonest);
                }
            }
        }
        self.until.insert(key, until);
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }

    pub fn clear(&mut self) {
        self.until.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bounded_set_forgets_its_oldest_members() {
        let mut set = BoundedSet::new(3);
        set.extend([1, 2, 3]);
        set.insert(4);
        assert_eq!(set.len(), 3);
        assert!(!set.contains(&1));
        assert!(set.contains(&2) && set.contains(&4));
        assert!(set.remove(&3));
        assert!(!set.remove(&3));
        for i in 10..10_000 {
            set.insert(i);
            if i % 2 == 0 {
                set.remove(&i);
            }
        }
        assert!(set.len() <= 3);
        assert!(
            set.order.len() <= 2 * 3 + 1,
            "order kept {}",
            set.order.len()
        );
        assert!(set.contains(&9_999));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expiring_map_stays_within_its_cap() {
        let mut map = ExpiringMap::new(100);
        let ttl = Duration::from_secs(60);
        for i in 0..10_000 {
            map.insert(format!("exchange-{i}"), Instant::now() + ttl);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(map.len(), 100);
        assert!(map.is_live(&"exchange-9999".to_string()));
        assert!(!map.is_live(&"exchange-0".to_string()));
        tokio::time::advance(ttl).await;
        assert!(!map.is_live(&"exchange-9999".to_string()));
        map.insert("fresh".to_string(), Instant::now() + ttl);
        assert_eq!(map.len(), 1, "expired keys go first");
        map.clear();
        assert!(map.is_empty());
    }
}
