//! What the scenarios on `twostage-aspace` address spaces share: running the bundled guest on a
//! space, moving the vCPU between EPTs, and a space holding a copy of the guest's RAM.

use crate::guest::{self, GuestOps, Op, Unassigned};
use crate::{ctx, Caps};
use alloc::vec;
use twostage_aspace::{AddressSpace, Backend, FaultOutcome};
use twostage_hv_x86::hv::{invept, Ept, FaultAction, Hv, Vcpu};
use twostage_npt::{Ept4, GpaRange, GuestPhysAddr, MappingFlags};
use twostage_vmx::exit::EptViolation;

pub(crate) type Space = AddressSpace<Ept4, &'static twostage_baremetal::frames::Frames>;

/// Runs `op` with the vCPU on `space`'s EPT, faults resolved by the address space.
pub(crate) fn op_on(hv: &mut Hv, space: &mut Space, op: Op) -> Result<u64, alloc::string::String> {
    let mut handler = |hv: &mut Hv, v: &EptViolation| match space.handle_fault(v.nested_page_fault_info()) {
        FaultOutcome::Resolved { flush } => {
            space
                .flush(flush, |inv| {
                    invept(&mut hv.vcpu, inv);
                })
                .expect("its own token");
            FaultAction::Retry
        }
        _ => FaultAction::Fail("address space did not resolve the fault"),
    };
    ctx(hv.op(op, &mut handler, &mut Unassigned), "guest op")
}

pub(crate) fn load_eptp(vcpu: &mut Vcpu, table: &Ept) -> Result<(), alloc::string::String> {
    ctx(vcpu.load_ept(table), "EPTP").map(drop)
}

/// An address space holding a copy of the bundled guest's RAM (code, page tables, stack), so
/// the guest can run on it, plus a demand-zero data region of `data_len` bytes at `data`.
pub(crate) fn guest_space(
    hv: &mut Hv,
    c: &Caps,
    data: u64,
    data_len: u64,
) -> Result<(Space, twostage_aspace::RegionId), alloc::string::String> {
    let mut space: Space = ctx(AddressSpace::new(hv.frames, c.ept.table_options(true)), "new address space")?;
    let ram = GpaRange::from_start_len(GuestPhysAddr::new(0), guest::RAM_SIZE).ok_or("range")?;
    let (_, f) = ctx(space.add_region("ram", ram, MappingFlags::RWX, Backend::DemandZero), "ram region")?;
    space.flush_unloaded(f).expect("its own token");
    let range = GpaRange::from_start_len(GuestPhysAddr::new(data), data_len).ok_or("range")?;
    let (id, f) = ctx(space.add_region("data", range, MappingFlags::RW, Backend::DemandZero), "data region")?;
    space.flush_unloaded(f).expect("its own token");
    let mut snapshot = vec![0u8; guest::RAM_SIZE as usize];
    ctx(hv.copy_from_guest(GuestPhysAddr::new(0), &mut snapshot), "snapshot")?;
    let f = space.load_image(GuestPhysAddr::new(0), &snapshot).map_err(|e| alloc::format!("load_image: {e:?}"))?;
    space.flush_unloaded(f).expect("its own token");
    Ok((space, id))
}
