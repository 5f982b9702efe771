//! Reference counts of the data frames that address spaces own or share (copy-on-write).
#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use twostage_npt::{HostPhysAddr, FRAME_SIZE};

/// Frames per chunk of counts: one chunk covers 16 MiB of host memory.
const CHUNK_FRAMES: usize = 4096;
const FRAME_SHIFT: u32 = FRAME_SIZE.trailing_zeros();

/// The reference counts of data frames, shared by an address space and all its forks.
///
/// A frame owned by one address space has count 1; [`crate::AddressSpace::fork`] raises the
/// count of every frame it shares. A frame whose count is above 1 is mapped read-only in every
/// holder; a write fault gives the writer a private copy (or, for the last holder, only the
/// write right back). The count drops when a holder's flush that unmapped the frame is carried
/// out, so no frame is reused while a stale translation may still reach it.
///
/// The counts are flat arrays indexed by frame number, one per 16 MiB chunk of host memory
/// that holds a counted frame (sorted by chunk, with the last chunk used remembered), so a
/// count is an index, not a tree search. Cloning gives another handle to the same table.
#[derive(Clone, Default)]
pub struct FrameRefs {
    inner: Arc<spin::Mutex<Counts>>,
}

/// Counts of the frames of one 16 MiB chunk.
struct Chunk {
    /// Frame number of the chunk's first frame, divided by [`CHUNK_FRAMES`].
    key: u64,
    /// Frames of the chunk with a count above 0.
    live: u32,
    counts: Box<[u32]>,
}

#[derive(Default)]
struct Counts {
    /// Sorted by `key`.
    chunks: Vec<Chunk>,
    /// Index in `chunks` of the chunk used last (a hint; checked before use).
    last: usize,
    /// Frames with a count above 0.
    frames: usize,
}

fn split(hpa: HostPhysAddr) -> (u64, usize) {
    let frame = hpa.as_u64() >> FRAME_SHIFT;
    (frame / CHUNK_FRAMES as u64, (frame % CHUNK_FRAMES as u64) as usize)
}

impl Counts {
    /// Index of the chunk with `key`, if there is one.
    #[inline]
    fn find(&mut self, key: u64) -> Option<usize> {
        if self.chunks.get(self.last).is_some_and(|c| c.key == key) {
            return Some(self.last);
        }
        let i = self.chunks.binary_search_by_key(&key, |c| c.key).ok()?;
        self.last = i;
        Some(i)
    }

    /// The count slot of `hpa`, creating its chunk if needed.
    fn slot_mut(&mut self, hpa: HostPhysAddr) -> (usize, usize) {
        let (key, idx) = split(hpa);
        let i = match self.find(key) {
            Some(i) => i,
            None => {
                let at = self.chunks.partition_point(|c| c.key < key);
                self.chunks.insert(at, Chunk { key, live: 0, counts: vec![0; CHUNK_FRAMES].into_boxed_slice() });
                self.last = at;
                at
            }
        };
        (i, idx)
    }

    fn add(&mut self, hpa: HostPhysAddr, n: u32) {
        let (i, idx) = self.slot_mut(hpa);
        let c = &mut self.chunks[i];
        if c.counts[idx] == 0 {
            c.live += 1;
            self.frames += 1;
        }
        c.counts[idx] += n;
    }

    fn count(&mut self, hpa: HostPhysAddr) -> u32 {
        let (key, idx) = split(hpa);
        self.find(key).map_or(0, |i| self.chunks[i].counts[idx])
    }

    fn release(&mut self, hpa: HostPhysAddr) -> bool {
        let (key, idx) = split(hpa);
        let Some(i) = self.find(key) else { return false };
        let c = &mut self.chunks[i];
        match c.counts[idx] {
            // Not registered: never ours to free.
            0 => false,
            1 => {
                c.counts[idx] = 0;
                c.live -= 1;
                self.frames -= 1;
                if c.live == 0 {
                    self.chunks.remove(i);
                    self.last = 0;
                }
                true
            }
            _ => {
                c.counts[idx] -= 1;
                false
            }
        }
    }
}

impl FrameRefs {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a newly allocated frame with count 1.
    pub(crate) fn insert_new(&self, hpa: HostPhysAddr) {
        let mut c = self.inner.lock();
        debug_assert_eq!(c.count(hpa), 0, "frame {hpa:?} registered twice");
        c.add(hpa, 1);
    }

    /// Adds one holder to a registered frame.
    #[cfg(test)]
    fn share(&self, hpa: HostPhysAddr) {
        self.inner.lock().add(hpa, 1);
    }

    /// Adds one holder to each frame of `frames` (one lock for all of them).
    pub(crate) fn share_all(&self, frames: impl IntoIterator<Item = HostPhysAddr>) {
        let mut c = self.inner.lock();
        for hpa in frames {
            c.add(hpa, 1);
        }
    }

    /// Adds one holder to each of `n` registered frames from `first` on (one lock, one chunk
    /// lookup per 16 MiB).
    pub(crate) fn share_run(&self, first: HostPhysAddr, n: u64) {
        let mut c = self.inner.lock();
        let mut frame = first.as_u64() >> FRAME_SHIFT;
        let end = frame + n;
        while frame < end {
            let (i, idx) = c.slot_mut(HostPhysAddr::new(frame << FRAME_SHIFT));
            let take = (CHUNK_FRAMES - idx).min((end - frame) as usize);
            let chunk = &mut c.chunks[i];
            let mut born = 0;
            for count in &mut chunk.counts[idx..idx + take] {
                born += u32::from(*count == 0);
                *count += 1;
            }
            chunk.live += born;
            c.frames += born as usize;
            frame += take as u64;
        }
    }

    /// How many holders a frame has (0 if unknown).
    pub fn count(&self, hpa: HostPhysAddr) -> u32 {
        self.inner.lock().count(hpa)
    }

    /// Drops one holder; returns `true` when that was the last one (the caller frees the frame).
    pub(crate) fn release(&self, hpa: HostPhysAddr) -> bool {
        self.inner.lock().release(hpa)
    }

    /// Drops one holder of each frame of `frames` (one lock for all of them) and calls `free`
    /// for each frame whose last holder that was.
    pub(crate) fn release_all(&self, frames: &[HostPhysAddr], mut free: impl FnMut(HostPhysAddr)) {
        if frames.is_empty() {
            return;
        }
        let mut c = self.inner.lock();
        for &hpa in frames {
            if c.release(hpa) {
                free(hpa);
            }
        }
    }

    /// Whether both handles reach the same table.
    pub fn same_table(&self, other: &FrameRefs) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Number of frames registered (shared frames count once).
    pub fn frames(&self) -> usize {
        self.inner.lock().frames
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

    #[test]
    fn counts_are_per_frame_across_chunks() {
        let refs = FrameRefs::new();
        // Frames in three chunks, registered out of order, plus a neighbour in the same chunk.
        let far = HostPhysAddr::new(0x40_0000_0000);
        let low = HostPhysAddr::new(0x2000);
        let mid = HostPhysAddr::new((CHUNK_FRAMES as u64 * FRAME_SIZE as u64) * 3 + 0x5000);
        for h in [far, low, mid] {
            refs.insert_new(h);
        }
        refs.share_all([mid, far]);
        refs.share_run(mid, 1);
        assert_eq!((refs.count(low), refs.count(mid), refs.count(far)), (1, 3, 2));
        assert_eq!(refs.count(low + 0x1000), 0, "a neighbour is not counted");
        assert_eq!(refs.frames(), 3);
        let mut freed = Vec::new();
        refs.release_all(&[low, mid, far, far, low], |h| freed.push(h));
        assert_eq!(freed, [low, far], "freed on the last release only; an unknown frame is not freed");
        assert_eq!(refs.count(mid), 2);
        assert_eq!(refs.frames(), 1);
        refs.release_all(&[mid, mid], |h| freed.push(h));
        assert_eq!(freed.last(), Some(&mid));
        assert_eq!(refs.frames(), 0);
        // A run across a chunk boundary.
        let edge = HostPhysAddr::new((CHUNK_FRAMES as u64 - 2) * FRAME_SIZE as u64);
        refs.share_run(edge, 4);
        assert_eq!(refs.frames(), 4);
        for i in 0..4 {
            assert_eq!(refs.count(edge + i * FRAME_SIZE as u64), 1);
        }
        assert_eq!(refs.count(edge + 4 * FRAME_SIZE as u64), 0);
    }
}
