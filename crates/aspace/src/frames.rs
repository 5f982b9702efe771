//! Reference counts of the data frames that address spaces own or share (copy-on-write).

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use twostage_npt::HostPhysAddr;

/// The reference counts of data frames, shared by an address space and all its forks.
///
/// A frame owned by one address space has count 1; [`crate::AddressSpace::fork`] raises the
/// count of every frame it shares. A frame whose count is above 1 is mapped read-only in every
/// holder; a write fault gives the writer a private copy (or, for the last holder, only the
/// write right back). The count drops when a holder's flush that unmapped the frame is carried
/// out, so no frame is reused while a stale translation may still reach it.
///
/// Cloning gives another handle to the same table.
#[derive(Clone, Default)]
pub struct FrameRefs {
    inner: Arc<spin::Mutex<BTreeMap<HostPhysAddr, u32>>>,
}

impl FrameRefs {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a newly allocated frame with count 1.
    pub(crate) fn insert_new(&self, hpa: HostPhysAddr) {
        let old = self.inner.lock().insert(hpa, 1);
        debug_assert!(old.is_none(), "frame {hpa:?} registered twice");
    }

    /// Adds one holder to a registered frame.
    pub(crate) fn share(&self, hpa: HostPhysAddr) {
        *self.inner.lock().entry(hpa).or_insert(0) += 1;
    }

    /// How many holders a frame has (0 if unknown).
    pub fn count(&self, hpa: HostPhysAddr) -> u32 {
        self.inner.lock().get(&hpa).copied().unwrap_or(0)
    }

    /// Drops one holder; returns `true` when that was the last one (the caller frees the frame).
    pub(crate) fn release(&self, hpa: HostPhysAddr) -> bool {
        let mut map = self.inner.lock();
        match map.get_mut(&hpa) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                map.remove(&hpa);
                true
            }
            // Not registered: never ours to free.
            None => false,
        }
    }

    /// Whether both handles reach the same table.
    pub fn same_table(&self, other: &FrameRefs) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Number of frames registered (shared frames count once).
    pub fn frames(&self) -> usize {
        self.inner.lock().len()
    }
}

impl core::fmt::Debug for FrameRefs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "FrameRefs({} frames)", self.frames())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_release_says_free() {
        let refs = FrameRefs::new();
        let a = HostPhysAddr::new(0x1000);
        refs.insert_new(a);
        refs.share(a);
        assert_eq!(refs.count(a), 2);
        assert!(!refs.release(a));
        assert!(refs.release(a));
        assert_eq!(refs.count(a), 0);
        // A frame never registered is never ours to free.
        assert!(!refs.release(a));
        let other = refs.clone();
        other.insert_new(a);
        assert_eq!(refs.frames(), 1, "clones share one table");
    }
}
