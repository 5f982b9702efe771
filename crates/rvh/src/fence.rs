//! Carrying out the engine's invalidations as HFENCE.GVMA, scoped by guest-physical address and VMID.

use core::fmt;
use twostage_npt::{GuestPhysAddr, Invalidation};

/// One G-stage fence (Privileged 1.12 §8.3.2: HFENCE.GVMA rs1 = guest-physical address >> 2,
/// rs2 = VMID; rs1 = x0 orders every address of that VMID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GvmaFence {
    /// HFENCE.GVMA rs1 = gpa >> 2, rs2 = vmid.
    Address {
        /// The guest-physical address of the changed leaf.
        gpa: GuestPhysAddr,
        /// The VMID the table runs under.
        vmid: u16,
    },
    /// HFENCE.GVMA x0, rs2 = vmid.
    Vmid {
        /// The VMID.
        vmid: u16,
    },
}

impl GvmaFence {
    /// The rs1 operand: the guest-physical address shifted right by 2 (§8.3.2), or 0 for x0.
    pub const fn rs1(self) -> u64 {
        match self {
            Self::Address { gpa, .. } => gpa.as_u64() >> 2,
            Self::Vmid { .. } => 0,
        }
    }
}

/// An invalidation that cannot be carried out on a RISC-V hart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotGStage;

impl fmt::Display for NotGStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an EPT invalidation was handed to the RISC-V fence code")
    }
}

/// Calls `fence` for every HFENCE.GVMA that `inv` asks for, for a table running under `vmid`.
pub fn plan_gvma(inv: &Invalidation<'_>, vmid: u16, mut fence: impl FnMut(GvmaFence)) -> Result<usize, NotGStage> {
    match inv {
        Invalidation::None => Ok(0),
        Invalidation::GvmaAddresses { addrs, .. } => {
            addrs.iter().for_each(|&gpa| fence(GvmaFence::Address { gpa, vmid }));
            Ok(addrs.len())
        }
        Invalidation::GvmaAll { .. } => {
            fence(GvmaFence::Vmid { vmid });
            Ok(1)
        }
        Invalidation::InveptSingleContext { .. } => Err(NotGStage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use twostage_npt::HostPhysAddr;

    #[test]
    fn leaves_become_address_fences_and_tables_vmid_fences() {
        let root = HostPhysAddr::new(0x8040_0000);
        let addrs = [GuestPhysAddr::new(0x8000_1000), GuestPhysAddr::new(0x8020_0000)];
        let mut out = Vec::new();
        let n = plan_gvma(&Invalidation::GvmaAddresses { root, addrs: &addrs }, 3, |f| out.push(f)).unwrap();
        assert_eq!(n, 2);
        assert_eq!(out[0], GvmaFence::Address { gpa: addrs[0], vmid: 3 });
        assert_eq!(out[0].rs1(), 0x8000_1000 >> 2);
        out.clear();
        plan_gvma(&Invalidation::GvmaAll { root }, 3, |f| out.push(f)).unwrap();
        assert_eq!(out, [GvmaFence::Vmid { vmid: 3 }]);
        assert_eq!(plan_gvma(&Invalidation::None, 3, |_| panic!("no fence for None")), Ok(0));
        assert_eq!(plan_gvma(&Invalidation::InveptSingleContext { root }, 3, |_| {}), Err(NotGStage));
    }
}
