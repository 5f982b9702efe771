//! The architecture-neutral description of a nested page fault.

use crate::addr::GuestPhysAddr;
use crate::flags::{Access, MappingFlags};

/// A guest access that the nested table did not allow: an EPT violation (exit reason 48) or a
/// RISC-V guest-page fault (scause 20, 21, 23), reduced to what the address space needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedPageFaultInfo {
    /// The guest-physical address the guest tried to reach.
    pub fault_guest_paddr: GuestPhysAddr,
    /// The access it tried: exactly one of READ, WRITE, EXECUTE.
    pub access_flags: MappingFlags,
}

impl NestedPageFaultInfo {
    /// A fault of `access` at `gpa`.
    pub fn new(gpa: GuestPhysAddr, access: Access) -> Self {
        Self { fault_guest_paddr: gpa, access_flags: access.as_flags() }
    }

    /// The access as an enum (a write wins over a read, then execute, if several bits are set).
    pub fn access(&self) -> Access {
        if self.access_flags.contains(MappingFlags::WRITE) {
            Access::Write
        } else if self.access_flags.contains(MappingFlags::EXECUTE) && !self.access_flags.contains(MappingFlags::READ) {
            Access::Execute
        } else {
            Access::Read
        }
    }
}
