//! The address space's flush token, and the pending list of what changes still owe.

use alloc::vec::Vec;
use core::any::TypeId;
use twostage_npt::{Family, FamilyKind, Flush, Format, GStageFamily, GuestPhysAddr, GvmaInvalidation};
use twostage_npt::{HostPhysAddr, InvalidationOf};

/// What must be invalidated after a change to an address space before the change can be relied
/// on: the nested table's invalidation (INVEPT or HFENCE.GVMA, named by
/// [`SpaceFlush::invalidation`]).
///
/// Carry it out with [`crate::AddressSpace::flush`]. The token only says what to invalidate: the
/// data frames a change unmapped wait in the space's pending list and are released (freed, or
/// their copy-on-write count lowered) by the first flush carried out whose invalidation covers
/// the page they were mapped at, by a whole-context invalidation, or when the space is dropped.
/// So a dropped token leaks nothing, but until something covers them the guest may still reach
/// the unmapped pages through a stale translation: dropping a token is a coherence bug, not a
/// memory-safety one.
#[must_use = "a changed address space must be flushed: pass the token to AddressSpace::flush"]
pub struct SpaceFlush<F: Format> {
    pub(crate) table: Option<Flush<F>>,
}

impl<F: Format> SpaceFlush<F> {
    /// A token that asks for nothing.
    pub fn none() -> Self {
        Self { table: None }
    }

    pub(crate) fn from_table(f: Flush<F>) -> Self {
        Self { table: Some(f) }
    }

    /// Adds a table flush.
    pub(crate) fn add(&mut self, f: Flush<F>) {
        self.table = Some(match self.table.take() {
            Some(t) => t.merge(f),
            None => f,
        });
    }

    /// One token covering both.
    pub fn merge(mut self, mut other: SpaceFlush<F>) -> Self {
        if let Some(t) = other.table.take() {
            self.add(t);
        }
        self
    }

    /// The hardware invalidation this token asks for.
    pub fn invalidation(&self) -> InvalidationOf<'_, F> {
        match &self.table {
            Some(t) => t.invalidation(),
            None => <F::Family as Family>::nothing(),
        }
    }

    /// Whether nothing needs invalidating.
    pub fn is_empty(&self) -> bool {
        self.table.as_ref().is_none_or(|t| t.is_empty())
    }
}

impl<F: Format> core::fmt::Debug for SpaceFlush<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SpaceFlush({:?})", self.invalidation())
    }
}

/// What the space's changes still owe: the table invalidation of changes whose token the space
/// kept (failed operations, [`crate::GuestMemory`] writes), and the data frames unmapped but not
/// yet released.
pub(crate) struct Pending<F: Format> {
    /// Table flush of changes whose token the caller never got.
    pub(crate) table: Option<Flush<F>>,
    /// Data frames unmapped from a page (guest-physical base of the leaf, first frame, frames:
    /// 1, or 512 / 262,144 for a huge leaf): released once an invalidation covering that leaf
    /// has been carried out.
    pub(crate) release: Vec<(GuestPhysAddr, HostPhysAddr, u64)>,
}

impl<F: Format> Pending<F> {
    pub(crate) fn new() -> Self {
        Self { table: None, release: Vec::new() }
    }

    /// Whether anything is owed.
    pub(crate) fn is_empty(&self) -> bool {
        self.release.is_empty() && self.table.as_ref().is_none_or(|t| t.is_empty())
    }

    /// Takes out the frames whose page `inv` (just carried out) covers.
    pub(crate) fn take_covered(&mut self, inv: &InvalidationOf<'_, F>) -> Vec<(HostPhysAddr, u64)> {
        let mut out = Vec::new();
        match coverage::<F>(inv) {
            Coverage::Nothing => {}
            Coverage::All => out.extend(self.release.drain(..).map(|(_, h, n)| (h, n))),
            // A by-address fence at a huge leaf's base drops that leaf's translations (the
            // address is the one the table noted for the leaf).
            Coverage::Pages(pages) => self.release.retain(|&(gpa, hpa, n)| {
                let covered = pages.contains(&gpa);
                if covered {
                    out.push((hpa, n));
                }
                !covered
            }),
        }
        out
    }
}

/// Which pages an invalidation of the table drops every cached translation of.
enum Coverage<'a> {
    Nothing,
    Pages(&'a [GuestPhysAddr]),
    All,
}

fn coverage<'r, 'a: 'r, F: Format>(inv: &'r InvalidationOf<'a, F>) -> Coverage<'r> {
    if *inv == <F::Family as Family>::nothing() {
        return Coverage::Nothing;
    }
    match <F::Family as Family>::KIND {
        // An EPT invalidation other than "none" is INVEPT single-context on this EPTP.
        FamilyKind::Ept => Coverage::All,
        FamilyKind::GStage => {
            if TypeId::of::<F::Family>() != TypeId::of::<GStageFamily>() {
                return Coverage::Nothing; // Unreachable: the family trait is sealed.
            }
            // SAFETY: `F::Family` is `GStageFamily` (checked just above), whose
            // `Invalidation<'a>` is `GvmaInvalidation<'a>`: the pointer is to a value of exactly
            // that type, borrowed for `'r`.
            let g: &'r GvmaInvalidation<'a> = unsafe { &*(inv as *const InvalidationOf<'a, F>).cast() };
            match *g {
                GvmaInvalidation::None => Coverage::Nothing,
                GvmaInvalidation::Addresses { addrs, .. } => Coverage::Pages(addrs),
                GvmaInvalidation::All { .. } => Coverage::All,
                // Carried out on one hart only: the others may still reach the frames.
                GvmaInvalidation::Local { .. } => Coverage::Nothing,
            }
        }
    }
}

/// A [`SpaceFlush`] handed to an address space whose table it does not belong to. Nothing was
/// invalidated and nothing released; the token is inside, to be carried out on its own space.
#[must_use = "the token inside still needs carrying out on its own address space"]
pub struct ForeignSpaceFlush<F: Format> {
    // Boxed so that `Result<(), ForeignSpaceFlush<F>>` stays small on the path that succeeds.
    token: alloc::boxed::Box<SpaceFlush<F>>,
    space_root: HostPhysAddr,
}

impl<F: Format> ForeignSpaceFlush<F> {
    pub(crate) fn new(token: SpaceFlush<F>, space_root: HostPhysAddr) -> Self {
        Self { token: alloc::boxed::Box::new(token), space_root }
    }

    /// Root of the table of the space the token was handed to.
    pub fn space_root(&self) -> HostPhysAddr {
        self.space_root
    }

    /// The token, given back whole.
    pub fn into_token(self) -> SpaceFlush<F> {
        *self.token
    }
}

impl<F: Format> core::fmt::Debug for ForeignSpaceFlush<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ForeignSpaceFlush").field("token", &self.token).field("space_root", &self.space_root).finish()
    }
}

impl<F: Format> core::fmt::Display for ForeignSpaceFlush<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let root = self.token.table.as_ref().map_or(0, |t| t.root().as_u64());
        write!(
            f,
            "flush token of the address space whose table is rooted at {root:#x} handed to the one rooted at {:#x}: \
             nothing was invalidated",
            self.space_root.as_u64()
        )
    }
}

impl<F: Format> core::error::Error for ForeignSpaceFlush<F> {}
