//! The adapter registry: which adapter names are served, which pool slot each holds, who is
//! using it, and which one to evict. Pure bookkeeping: the scheduler makes the engine calls
//! (load into a slot, free a slot) that the answers here call for.
//!
//! An adapter may be registered without a slot (the pool was full of busy adapters, or it was
//! evicted); requests hold a lease on it from the moment they are queued until they end, so a
//! used adapter is never evicted. Pinned adapters are never evicted. An unloaded adapter is
//! *retired*: its name is free at once, its entry (and slot) stay until its last lease ends.

use std::path::PathBuf;

/// Stable identity of a registration (a name can be unloaded and loaded again).
pub(crate) type AdapterId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdapterEntry {
    pub id: AdapterId,
    pub name: String,
    pub path: PathBuf,
    pub slot: Option<u32>,
    pub pinned: bool,
    /// Logical time of the last admission or completion of a request using it.
    last_used: u64,
    /// Queued and running requests that use it.
    users: usize,
    /// Unloaded by name; dropped when its last user ends.
    retired: bool,
}

/// `retire` of a name that is not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotRegistered;

#[derive(Debug)]
pub(crate) struct AdapterRegistry {
    entries: Vec<AdapterEntry>,
    slots: u32,
    clock: u64,
    next_id: AdapterId,
}

impl AdapterRegistry {
    /// An empty registry over `slots` pool slots.
    pub fn new(slots: u32) -> Self {
        AdapterRegistry { entries: Vec::new(), slots, clock: 0, next_id: 0 }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn index(&self, id: AdapterId) -> Option<usize> {
        self.entries.iter().position(|a| a.id == id)
    }

    pub fn get(&self, id: AdapterId) -> Option<&AdapterEntry> {
        self.entries.iter().find(|a| a.id == id)
    }

    /// The pool slot of adapter `id`, if it is resident.
    pub fn slot_of(&self, id: AdapterId) -> Option<u32> {
        self.get(id).and_then(|a| a.slot)
    }

    /// Whether `name` is served (registered and not unloaded).
    pub fn is_registered(&self, name: &str) -> bool {
        self.entries.iter().any(|a| !a.retired && a.name == name)
    }

    /// Served adapters, in registration order.
    pub fn active(&self) -> impl Iterator<Item = &AdapterEntry> {
        self.entries.iter().filter(|a| !a.retired)
    }

    /// Slots held (by served or retired adapters).
    pub fn slots_used(&self) -> usize {
        self.entries.iter().filter(|a| a.slot.is_some()).count()
    }

    /// A queued request takes a lease on adapter `name`; `None` when it is not served.
    pub fn acquire(&mut self, name: &str) -> Option<AdapterId> {
        let entry = self.entries.iter_mut().find(|a| !a.retired && a.name == name)?;
        entry.users += 1;
        Some(entry.id)
    }

    /// A request using `id` was admitted: `id` is the most recently used adapter.
    pub fn touch(&mut self, id: AdapterId) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.iter_mut().find(|a| a.id == id) {
            entry.last_used = clock;
        }
    }

    /// A request's lease on `id` ends. Returns the entry when that was the last lease of a
    /// retired adapter: it is gone from the registry and the caller frees its slot.
    pub fn release(&mut self, id: AdapterId) -> Option<AdapterEntry> {
        let index = self.index(id)?;
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.users = entry.users.saturating_sub(1);
        entry.last_used = self.clock;
        self.take_if_unused(index)
    }

    /// A free slot, lowest first.
    pub fn free_slot(&self) -> Option<u32> {
        (0..self.slots).find(|s| !self.entries.iter().any(|a| a.slot == Some(*s)))
    }

    /// The least recently used resident adapter that is not pinned, that no queued or running
    /// request uses, and that is not `keep`.
    pub fn eviction_victim(&self, keep: Option<AdapterId>) -> Option<AdapterId> {
        self.entries
            .iter()
            .filter(|a| a.slot.is_some() && !a.pinned && a.users == 0 && Some(a.id) != keep)
            .min_by_key(|a| a.last_used)
            .map(|a| a.id)
    }

    /// Slots held by pinned adapters.
    pub fn pinned_slots(&self) -> u32 {
        self.entries.iter().filter(|a| a.pinned && a.slot.is_some()).count() as u32
    }

    /// Whether `id` holds a slot or could get one by eviction some day (not every slot pinned).
    pub fn can_ever_be_resident(&self, id: AdapterId) -> bool {
        self.slot_of(id).is_some() || self.pinned_slots() < self.slots
    }

    /// An unloaded adapter of `name` still holds a slot for its last requests (the pool holds
    /// one adapter per name, so a new registration of the name must wait for it).
    pub fn retired_holds_slot(&self, name: &str) -> bool {
        self.entries.iter().any(|a| a.retired && a.name == name && a.slot.is_some())
    }

    /// Records that `id` now holds `slot` (or none: evicted).
    pub fn set_slot(&mut self, id: AdapterId, slot: Option<u32>) {
        if let Some(entry) = self.entries.iter_mut().find(|a| a.id == id) {
            entry.slot = slot;
        }
    }

    /// Registers `name` (already validated and, with `slot`, loaded there) as most recently
    /// used, without users.
    pub fn register(&mut self, name: &str, path: PathBuf, slot: Option<u32>, pinned: bool) -> AdapterId {
        self.clock += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push(AdapterEntry { id, name: name.to_string(), path, slot, pinned, last_used: self.clock, users: 0, retired: false });
        id
    }

    /// Unloads `name`: no longer served from now on. Returns its entry when no request uses
    /// it (gone from the registry; the caller frees its slot), `None` while requests still do.
    pub fn retire(&mut self, name: &str) -> Result<Option<AdapterEntry>, NotRegistered> {
        let index = self.entries.iter().position(|a| !a.retired && a.name == name).ok_or(NotRegistered)?;
        self.entries[index].retired = true;
        Ok(self.take_if_unused(index))
    }

    fn take_if_unused(&mut self, index: usize) -> Option<AdapterEntry> {
        let entry = &self.entries[index];
        (entry.retired && entry.users == 0).then(|| self.entries.remove(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_with(names: &[(&str, Option<u32>, bool)]) -> (AdapterRegistry, Vec<AdapterId>) {
        let mut r = AdapterRegistry::new(3);
        let ids = names.iter().map(|&(n, slot, pin)| r.register(n, PathBuf::from(n), slot, pin)).collect();
        (r, ids)
    }

    #[test]
    fn evicts_the_least_recently_used_idle_unpinned_adapter() {
        let (mut r, ids) = registry_with(&[("pinned", Some(0), true), ("a", Some(1), false), ("b", Some(2), false)]);
        assert_eq!(r.free_slot(), None);
        // `a` is older than `b`, so it goes first; touching it makes `b` the oldest.
        assert_eq!(r.eviction_victim(None), Some(ids[1]));
        r.touch(ids[1]);
        assert_eq!(r.eviction_victim(None), Some(ids[2]));
        // A lease protects an adapter; `keep` excludes the one being made resident.
        assert_eq!(r.acquire("b"), Some(ids[2]));
        assert_eq!(r.eviction_victim(None), Some(ids[1]));
        assert_eq!(r.eviction_victim(Some(ids[1])), None);
        r.set_slot(ids[1], None);
        assert_eq!(r.free_slot(), Some(1));
        assert_eq!(r.slots_used(), 2);
    }

    #[test]
    fn a_retired_adapter_stays_until_its_last_lease_ends() {
        let (mut r, ids) = registry_with(&[("a", Some(0), false)]);
        assert_eq!(r.acquire("a"), Some(ids[0]));
        assert_eq!(r.retire("a"), Ok(None));
        assert!(!r.is_registered("a") && r.acquire("a").is_none());
        assert!(r.retired_holds_slot("a"));
        assert_eq!(r.retire("a"), Err(NotRegistered));
        let gone = r.release(ids[0]).expect("last lease ends: entry handed back");
        assert_eq!((gone.name.as_str(), gone.slot), ("a", Some(0)));
        assert!(r.get(ids[0]).is_none() && r.free_slot() == Some(0));
        // Unused: dropped at once.
        let b = r.register("b", PathBuf::from("b"), Some(0), false);
        assert_eq!(r.retire("b").map(|e| e.map(|e| e.id)), Ok(Some(b)));
    }

    #[test]
    fn pins_decide_whether_an_adapter_can_ever_get_a_slot() {
        let (mut r, ids) = registry_with(&[("p0", Some(0), true), ("p1", Some(1), true), ("p2", Some(2), true)]);
        let waiting = r.register("w", PathBuf::from("w"), None, false);
        assert!(!r.can_ever_be_resident(waiting));
        assert!(r.can_ever_be_resident(ids[0]));
        assert_eq!(r.eviction_victim(None), None);
        assert_eq!(r.pinned_slots(), 3);
    }
}
