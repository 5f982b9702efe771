//! Carrying out the engine's invalidations as HFENCE.GVMA, scoped by guest-physical address and VMID.

use twostage_npt::{GuestPhysAddr, GvmaInvalidation};

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

/// Calls `fence` for every HFENCE.GVMA that `inv` asks for, for a table running under `vmid`, on
/// the hart carrying it out (for [`GvmaInvalidation::Local`] that is all it asks for; the others
/// are asked by [`crate::shootdown::Shootdown::request`]). Returns how many fences that was.
pub fn plan_gvma(inv: &GvmaInvalidation<'_>, vmid: u16, mut fence: impl FnMut(GvmaFence)) -> usize {
    match inv {
        GvmaInvalidation::None => 0,
        GvmaInvalidation::Addresses { addrs, .. } => {
            addrs.iter().for_each(|&gpa| fence(GvmaFence::Address { gpa, vmid }));
            addrs.len()
        }
        GvmaInvalidation::All { .. } | GvmaInvalidation::Local { addrs: None, .. } => {
            fence(GvmaFence::Vmid { vmid });
            1
        }
        GvmaInvalidation::Local { addrs: Some(addrs), .. } => {
            addrs.iter().for_each(|&gpa| fence(GvmaFence::Address { gpa, vmid }));
            addrs.len()
        }
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
        let n = plan_gvma(&GvmaInvalidation::Addresses { root, addrs: &addrs }, 3, |f| out.push(f));
        assert_eq!(n, 2);
        assert_eq!(out[0], GvmaFence::Address { gpa: addrs[0], vmid: 3 });
        assert_eq!(out[0].rs1(), 0x8000_1000 >> 2);
        out.clear();
        plan_gvma(&GvmaInvalidation::All { root }, 3, |f| out.push(f));
        assert_eq!(out, [GvmaFence::Vmid { vmid: 3 }]);
        assert_eq!(plan_gvma(&GvmaInvalidation::None, 3, |_| panic!("no fence for None")), 0);
    }
}
