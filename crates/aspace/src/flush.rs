//! The address space's flush token: a table flush plus the data frames it retires.

use alloc::vec::Vec;
use twostage_npt::{Family, Flush, Format, HostPhysAddr, InvalidationOf};

/// What must happen after a change to an address space before it can be relied on: the
/// nested table's invalidation, then the release of the data frames the change unmapped (a
/// frame is handed back, or its copy-on-write count lowered, only once no translation to it can
/// survive).
///
/// Carry it out with [`crate::AddressSpace::flush`].
#[must_use = "a changed address space must be flushed: pass the token to AddressSpace::flush"]
pub struct SpaceFlush<F: Format> {
    pub(crate) table: Option<Flush<F>>,
    pub(crate) release: Vec<HostPhysAddr>,
}

impl<F: Format> SpaceFlush<F> {
    /// A token that asks for nothing.
    pub fn none() -> Self {
        Self { table: None, release: Vec::new() }
    }

    pub(crate) fn from_table(f: Flush<F>) -> Self {
        Self { table: Some(f), release: Vec::new() }
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
        self.release.append(&mut other.release);
        self
    }

    /// The hardware invalidation this token asks for.
    pub fn invalidation(&self) -> InvalidationOf<'_, F> {
        match &self.table {
            Some(t) => t.invalidation(),
            None => <F::Family as Family>::nothing(),
        }
    }

    /// Whether nothing needs invalidating and nothing is released.
    pub fn is_empty(&self) -> bool {
        self.release.is_empty() && self.table.as_ref().is_none_or(|t| t.is_empty())
    }

    /// Data frames (or copy-on-write references) released when the token is carried out.
    pub fn released_frames(&self) -> &[HostPhysAddr] {
        &self.release
    }
}

impl<F: Format> core::fmt::Debug for SpaceFlush<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SpaceFlush({:?}, {} frames released)", self.invalidation(), self.release.len())
    }
}
