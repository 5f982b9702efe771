//! Several vCPUs on one address space: a reader-writer lock and a stored invalidation.

use crate::dirty::PageBitmap;
use crate::error::{DirtyLogError, Failed, ForkError};
use crate::fault::FaultOutcome;
use crate::flush::SpaceFlush;
use crate::mem::{GuestMemError, GuestMemory};
use crate::space::AddressSpace;
use alloc::boxed::Box;
use twostage_npt::{Access, Format, FrameAllocator, GuestPhysAddr, InvalidationOf, NestedPageFaultInfo};

/// The invalidation callback for format `F`: carries out an invalidation of `F`'s family on every
/// CPU that may have the table loaded (INVEPT, HFENCE.GVMA, with shootdowns to the other
/// harts/cores).
pub type Invalidator<F> = Box<dyn for<'a> Fn(&InvalidationOf<'a, F>) + Send + Sync>;

/// An [`AddressSpace`] shared by several vCPUs.
///
/// Locking model: one reader-writer spin lock around the whole space. Reads of guest memory
/// take the read lock (any number at once). Everything that may change the table or the frames
/// takes the write lock: fault resolution, writes (they may populate a page or break
/// copy-on-write), compare-exchange, fork, dirty harvest, region changes. The flush of each change
/// is carried out, with the stored [`Invalidator`], before the write lock is released, so a
/// reader never sees a frame that is being freed and a vCPU resumed after a fault sees the new
/// mapping. Guest CPUs themselves access memory without the lock, as hardware does.
pub struct SharedAddressSpace<F: Format, A: FrameAllocator + Clone> {
    inner: spin::RwLock<AddressSpace<F, A>>,
    invalidate: Invalidator<F>,
}

impl<F: Format, A: FrameAllocator + Clone> SharedAddressSpace<F, A> {
    /// Wraps `space`; `invalidate` carries out every flush.
    pub fn new(space: AddressSpace<F, A>, invalidate: Invalidator<F>) -> Self {
        Self { inner: spin::RwLock::new(space), invalidate }
    }

    /// Gives the space back.
    pub fn into_inner(self) -> AddressSpace<F, A> {
        self.inner.into_inner()
    }

    /// Runs `f` with the read lock held.
    pub fn with<R>(&self, f: impl FnOnce(&AddressSpace<F, A>) -> R) -> R {
        f(&self.inner.read())
    }

    /// Runs `f` with the write lock held; `f` returns a flush, carried out before unlocking.
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut AddressSpace<F, A>) -> (R, SpaceFlush<F>)) -> R {
        let mut g = self.inner.write();
        let (r, flush) = f(&mut g);
        g.flush(flush, &*self.invalidate);
        r
    }

    /// Resolves a nested page fault and carries out its flush. A `Resolved` outcome comes back
    /// with an empty flush.
    pub fn handle_fault(&self, info: NestedPageFaultInfo) -> FaultOutcome<F> {
        self.with_mut(|s| match s.handle_fault(info) {
            FaultOutcome::Resolved { flush } => (FaultOutcome::Resolved { flush: SpaceFlush::none() }, flush),
            other => (other, SpaceFlush::none()),
        })
    }

    /// Forks the space (see [`AddressSpace::fork`]); the parent's flush is carried out.
    pub fn fork(&self) -> Result<AddressSpace<F, A>, ForkError> {
        self.with_mut(|s| match s.fork() {
            Ok((child, flush)) => (Ok(child), flush),
            Err(Failed { error, flush }) => (Err(error), flush),
        })
    }

    /// Harvests the dirty log (see [`AddressSpace::harvest_dirty`]); the re-arming flush is
    /// carried out.
    pub fn harvest_dirty(&self) -> Result<PageBitmap, DirtyLogError> {
        self.with_mut(|s| match s.harvest_dirty() {
            Ok((bits, flush)) => (Ok(bits), flush),
            Err(Failed { error, flush }) => (Err(error), flush),
        })
    }
}

impl<F: Format, A: FrameAllocator + Clone> GuestMemory for &SharedAddressSpace<F, A> {
    fn read_as(&mut self, gpa: GuestPhysAddr, buf: &mut [u8], access: Access) -> Result<(), GuestMemError> {
        self.inner.read().read_as(gpa, buf, access)
    }
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        self.with_mut(|s| match s.copy_to_guest(gpa, buf) {
            Ok(flush) => (Ok(()), flush),
            Err(Failed { error, flush }) => (Err(error), flush),
        })
    }
    fn compare_exchange_u64(
        &mut self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, GuestMemError> {
        self.with_mut(|s| match s.compare_exchange_u64(gpa, current, new) {
            Ok((v, flush)) => (Ok(v), flush),
            Err(Failed { error, flush }) => (Err(error), flush),
        })
    }
}
