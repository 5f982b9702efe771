//! TLB models that cache as much as the architecture allows and forget only when told to.
//!
//! Both models cache leaf translations and partial walks (non-leaf entries: "paging-structure
//! caches"). A lookup uses a cached leaf if one covers the address; otherwise it resumes the walk
//! below the deepest cached non-leaf entry, so a stale pointer to a freed or rewritten table is
//! followed exactly as a real walker with a stale paging-structure cache would. Nothing is
//! evicted except by the modelled invalidations (and by what the architecture says a fault
//! invalidates), which makes any missing or too narrow invalidation observable.

mod ept;
mod gstage;
pub mod harts;
pub mod operands;

pub use ept::{EptTlb, EptTlbStats};
pub use gstage::{CachedG, GstageTlb, GstageTlbStats};
