//! A bounded write-back cache of metadata tables (L2 tables, refcount blocks).
//!
//! One table is one cluster, keyed by its host offset. The cache only keeps
//! bytes and dirty flags; it never writes by itself. The engine decides when
//! dirty tables go to disk, because the order in which they do is what makes
//! the image crash consistent (refcount blocks, then L2 tables, then L1).
//! When the cache is full, the least recently used *clean* table is dropped;
//! if every table is dirty the engine must flush first ([`TableCache::full_of_dirty`]).

use std::collections::HashMap;

#[derive(Debug)]
struct Slot {
    data: Box<[u8]>,
    dirty: bool,
    used: u64,
}

/// A bounded cache of cluster-sized tables.
#[derive(Debug)]
pub struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    clock: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 4).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(4),
            clock: 0,
        }
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// The table at `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.used = clock;
            &*s.data
        })
    }

    /// The table at `offset` for modification; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.used = clock;
            s.dirty = true;
            &mut *s.data
        })
    }

    /// Whether inserting one more table needs a flush first: the cache is
    /// full and no table is clean.
    pub fn full_of_dirty(&self) -> bool {
        self.slots.len() >= self.capacity && self.slots.values().all(|s| s.dirty)
    }

    /// Inserts a table, dropping the least recently used clean one if full.
    /// The caller checks [`TableCache::full_of_dirty`] first; if every table
    /// is dirty the cache grows by one rather than lose data.
    pub fn insert(&mut self, offset: u64, data: Box<[u8]>, dirty: bool) {
        debug_assert!(
            self.slots.get(&offset).is_none_or(|s| !s.dirty),
            "a dirty table at {offset:#x} would be replaced"
        );
        if self.slots.len() >= self.capacity && !self.slots.contains_key(&offset) {
            // Drop the oldest eighth of the clean tables at once, so a full
            // cache does not scan every slot on every insert.
            let mut clean: Vec<(u64, u64)> = self
                .slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .map(|(k, s)| (s.used, *k))
                .collect();
            let n = (self.capacity / 8).max(1).min(clean.len());
            if n > 0 {
                clean.select_nth_unstable(n - 1);
                for (_, k) in &clean[..n] {
                    self.slots.remove(k);
                }
            }
        }
        self.clock += 1;
        self.slots.insert(
            offset,
            Slot {
                data,
                dirty,
                used: self.clock,
            },
        );
    }

    /// Offsets of dirty tables, in ascending order (sequential writes).
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a cached table without touching its recency.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.slots.get(&offset).map(|s| &*s.data)
    }

    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }

    /// Drops every table (dirty ones included: the caller has rebuilt what
    /// they describe).
    pub fn clear(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_clean_table() {
        let mut c = TableCache::new(4);
        for i in 0..4 {
            c.insert(i, vec![i as u8; 8].into(), false);
        }
        c.get(0);
        c.insert(9, vec![9; 8].into(), false);
        assert!(c.contains(0));
        assert!(!c.contains(1));
        assert!(c.contains(9));
    }

    #[test]
    fn never_evicts_dirty_tables() {
        let mut c = TableCache::new(4);
        for i in 0..4 {
            c.insert(i, vec![0; 8].into(), true);
        }
        assert!(c.full_of_dirty());
        c.insert(5, vec![0; 8].into(), false);
        assert_eq!(c.dirty(), vec![0, 1, 2, 3]);
        c.mark_clean(2);
        assert!(!c.full_of_dirty());
    }
}
