//! Reference counts of the data frames that address spaces own or share (copy-on-write).
#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
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
///
/// # Huge pages: runs
/// A huge page is backed by one allocation of 512 (2 MiB) or 262,144 (1 GiB) frames, which the
/// allocator must get back whole. It is registered as a *run* (`FrameRefs::insert_run`):
/// every frame of the run still has its own count (a huge leaf holds one reference to each, so
/// splitting a huge leaf into 4 KiB leaves changes no count, and a copy-on-write break or an
/// unmap of one 4 KiB page of it drops only that frame's count), and the run remembers how many
/// of its frames are still counted. A frame of a run whose count drops to 0 is not freed: the
/// run is freed, whole and once, when its last counted frame drops to 0. So no part of a run is
/// ever handed back while another part may still be mapped, and none is handed back twice.
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

/// One multi-frame allocation (a huge page's backing), by its base.
struct Run {
    /// Frames in the allocation.
    frames: u64,
    /// Frames of it whose count is above 0.
    live: u64,
}

#[derive(Default)]
struct Counts {
    /// Sorted by `key`.
    chunks: Vec<Chunk>,
    /// Multi-frame allocations, by the frame number of their base.
    runs: BTreeMap<u64, Run>,
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

    /// Drops one holder of `hpa`; returns the allocation to free (its base and frame count)
    /// when that was the last holder of the frame and, for a frame of a run, of the whole run.
    fn release(&mut self, hpa: HostPhysAddr) -> Option<(HostPhysAddr, u64)> {
        let (key, idx) = split(hpa);
        let i = self.find(key)?;
        let c = &mut self.chunks[i];
        match c.counts[idx] {
            // Not registered: never ours to free.
            0 => None,
            1 => {
                c.counts[idx] = 0;
                c.live -= 1;
                self.frames -= 1;
                if c.live == 0 {
                    self.chunks.remove(i);
                    self.last = 0;
                }
                self.last_of_run(hpa)
            }
            _ => {
                c.counts[idx] -= 1;
                None
            }
        }
    }

    /// Frame `hpa` just lost its last holder: the allocation that is now free, if any.
    fn last_of_run(&mut self, hpa: HostPhysAddr) -> Option<(HostPhysAddr, u64)> {
        let frame = hpa.as_u64() >> FRAME_SHIFT;
        let Some((&base, run)) = self.runs.range_mut(..=frame).next_back().filter(|(b, r)| frame < *b + r.frames)
        else {
            return Some((hpa, 1));
        };
        run.live -= 1;
        if run.live > 0 {
            return None;
        }
        let n = run.frames;
        self.runs.remove(&base);
        Some((HostPhysAddr::new(base << FRAME_SHIFT), n))
    }

    /// Adds `by` to the counts of `n` frames from `first` on; returns how many were at 0.
    fn add_run(&mut self, first: HostPhysAddr, n: u64) -> u64 {
        let mut frame = first.as_u64() >> FRAME_SHIFT;
        let end = frame + n;
        let mut born_total = 0;
        while frame < end {
            let (i, idx) = self.slot_mut(HostPhysAddr::new(frame << FRAME_SHIFT));
            let take = (CHUNK_FRAMES - idx).min((end - frame) as usize);
            let chunk = &mut self.chunks[i];
            let mut born = 0;
            for count in &mut chunk.counts[idx..idx + take] {
                born += u32::from(*count == 0);
                *count += 1;
            }
            chunk.live += born;
            self.frames += born as usize;
            born_total += u64::from(born);
            frame += take as u64;
        }
        born_total
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
    #[cfg(test)]
    fn share_all(&self, frames: impl IntoIterator<Item = HostPhysAddr>) {
        let mut c = self.inner.lock();
        for hpa in frames {
            c.add(hpa, 1);
        }
    }

    /// Adds one holder to each of `n` registered frames from `first` on (one lock, one chunk
    /// lookup per 16 MiB).
    pub(crate) fn share_run(&self, first: HostPhysAddr, n: u64) {
        self.inner.lock().add_run(first, n);
    }

    /// Registers a newly allocated run of `n` frames from `first` (one allocation, the backing
    /// of a huge page) with count 1 on each frame; it is freed whole when the last of its frames
    /// is released (see the type's documentation).
    pub(crate) fn insert_run(&self, first: HostPhysAddr, n: u64) {
        let mut c = self.inner.lock();
        let born = c.add_run(first, n);
        debug_assert_eq!(born, n, "run {first:?} overlaps registered frames");
        if n > 1 {
            c.runs.insert(first.as_u64() >> FRAME_SHIFT, Run { frames: n, live: n });
        }
    }

    /// How many holders a frame has (0 if unknown). For a frame of a huge-page run at a 2 MiB
    /// or 1 GiB boundary of the run, the most any frame of that aligned block of the run has:
    /// a leaf mapping the block from there (a huge leaf, or its 2 MiB pieces after a split) is
    /// shared when any page of it is, and its base is what callers ask about.
    pub fn count(&self, hpa: HostPhysAddr) -> u32 {
        let mut c = self.inner.lock();
        let frame = hpa.as_u64() >> FRAME_SHIFT;
        let Some((&base, run)) = c.runs.range(..=frame).next_back().filter(|(b, r)| frame < *b + r.frames) else {
            return c.count(hpa);
        };
        let end = base + run.frames;
        let block =
            [1u64 << 18, 1 << 9].into_iter().find(|&b| frame.is_multiple_of(b) && frame + b <= end).unwrap_or(1);
        (0..block).map(|i| c.count(hpa + i * FRAME_SIZE as u64)).max().unwrap_or(0)
    }

    /// How many holders exactly this frame has (0 if unknown).
    pub(crate) fn frame_count(&self, hpa: HostPhysAddr) -> u32 {
        self.inner.lock().count(hpa)
    }

    /// The largest count among the `n` frames from `first` on (a huge leaf is private only when
    /// every frame it maps has one holder).
    pub fn max_count(&self, first: HostPhysAddr, n: u64) -> u32 {
        let mut c = self.inner.lock();
        (0..n).map(|i| c.count(first + i * FRAME_SIZE as u64)).max().unwrap_or(0)
    }

    /// Drops one holder of each of the `n` frames from `first` on (one lock) and calls `free`
    /// with each allocation (base, frames) whose last holder that was.
    pub(crate) fn release_range(&self, first: HostPhysAddr, n: u64, mut free: impl FnMut(HostPhysAddr, u64)) {
        let mut c = self.inner.lock();
        for i in 0..n {
            if let Some((base, frames)) = c.release(first + i * FRAME_SIZE as u64) {
                free(base, frames);
            }
        }
    }

    /// Drops one holder of each frame of each `(first, n)` of `frames` (one lock for all of
    /// them) and calls `free` with each allocation (base, frames) whose last holder that was:
    /// a single frame, or a whole run once its last frame is released.
    pub(crate) fn release_all(&self, frames: &[(HostPhysAddr, u64)], mut free: impl FnMut(HostPhysAddr, u64)) {
        if frames.is_empty() {
            return;
        }
        let mut c = self.inner.lock();
        for &(first, n) in frames {
            for i in 0..n {
                if let Some((base, count)) = c.release(first + i * FRAME_SIZE as u64) {
                    free(base, count);
                }
            }
        }
    }

    /// Whether the `n` frames from `first` on all lie in one run (one huge-page allocation), so
    /// that a leaf of that size may map them: its base then speaks for all of them in
    /// [`FrameRefs::count`].
    pub(crate) fn in_one_run(&self, first: HostPhysAddr, n: u64) -> bool {
        let c = self.inner.lock();
        let frame = first.as_u64() >> FRAME_SHIFT;
        c.runs.range(..=frame).next_back().is_some_and(|(b, r)| frame + n <= *b + r.frames)
    }

    /// Runs (huge-page allocations) not yet freed.
    pub fn runs(&self) -> usize {
        self.inner.lock().runs.len()
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
        assert_eq!(refs.inner.lock().release(a), None);
        assert_eq!(refs.inner.lock().release(a), Some((a, 1)));
        assert_eq!(refs.count(a), 0);
        // A frame never registered is never ours to free.
        assert_eq!(refs.inner.lock().release(a), None);
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
        let one = |h| (h, 1);
        refs.release_all(&[low, mid, far, far, low].map(one), |h, n| {
            assert_eq!(n, 1);
            freed.push(h)
        });
        assert_eq!(freed, [low, far], "freed on the last release only; an unknown frame is not freed");
        assert_eq!(refs.count(mid), 2);
        assert_eq!(refs.frames(), 1);
        refs.release_all(&[mid, mid].map(one), |h, _| freed.push(h));
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

    #[test]
    fn a_run_is_freed_whole_once_its_last_frame_goes() {
        let refs = FrameRefs::new();
        let base = HostPhysAddr::new(0x4020_0000);
        let lone = HostPhysAddr::new(0x4000_0000);
        refs.insert_new(lone);
        refs.insert_run(base, 512);
        assert_eq!((refs.frames(), refs.runs()), (513, 1));
        // A fork shares the whole huge leaf; one side then drops frames one by one (a split
        // and copy-on-write breaks), the other drops the huge leaf.
        refs.share_run(base, 512);
        assert_eq!(refs.max_count(base, 512), 2);
        refs.release_all(&[(base + 0x5000, 1)], |_, _| unreachable!());
        assert_eq!(refs.frame_count(base), 2);
        assert_eq!(refs.frame_count(base + 0x5000), 1);
        refs.release_all(&[(base, 1)], |_, _| unreachable!());
        assert_eq!(refs.frame_count(base), 1);
        assert_eq!(refs.count(base), 2, "the base of a run speaks for its block: frame 1 is still shared");
        refs.share_run(base, 1);
        refs.share_run(base + 0x5000, 1);
        let mut freed = Vec::new();
        refs.release_all(&[(base + 0x1000, 1), (base + 0x3000, 1)], |h, n| freed.push((h, n)));
        assert_eq!(refs.max_count(base, 512), 2);
        refs.release_range(base, 512, |h, n| freed.push((h, n)));
        assert!(freed.is_empty(), "frames 1 and 3 are gone, the rest still held: nothing freed");
        assert_eq!(refs.count(base + 0x1000), 0);
        assert_eq!(refs.max_count(base, 512), 1);
        for i in (0..512u64).filter(|i| ![1, 3].contains(i)) {
            refs.release_all(&[(base + i * 0x1000, 1)], |h, n| freed.push((h, n)));
        }
        assert_eq!(freed, [(base, 512)], "the run is freed whole, once");
        assert_eq!((refs.frames(), refs.runs()), (1, 0));
        refs.release_all(&[(lone, 1)], |h, n| freed.push((h, n)));
        assert_eq!(freed.last(), Some(&(lone, 1)), "a lone frame next to a run is freed alone");
    }
}
