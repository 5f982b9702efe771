//! Host tests of the VMX flow against a fake CPU that records what the code asked of it.

use crate::caps::*;
use crate::controls as c;
use crate::exit::{EntryFailure, VmExit};
use crate::hw::*;
use crate::vcpu::*;
use crate::vmcs::VmcsField as F;
use std::cell::RefCell;
use std::collections::HashMap;
use twostage_npt::testing::HostRam;
use twostage_npt::EptCapabilities;
use twostage_npt::{Ept4, EptInvalidation, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, MappingFlags, PageTable};

/// IA32_VMX_EPT_VPID_CAP of Bochs' corei7_skylake_x (read on Bochs 2.7; README, platform notes).
const SKYLAKE_EPT_CAP: u64 = 0xf0106334141;
/// The same without A/D (bit 21), as on corei7_sandy_bridge_2600k.
const SANDY_EPT_CAP: u64 = SKYLAKE_EPT_CAP & !(1 << 21);

/// A scripted exit: what the fake writes into the VMCS when the guest is entered.
#[derive(Clone, Copy)]
struct ScriptedExit {
    reason: u32,
    qualification: u64,
    gpa: u64,
}

struct FakeCpu {
    msrs: HashMap<u32, u64>,
    cr0: u64,
    cr4: u64,
    vmcs: HashMap<u32, u64>,
    invept: RefCell<Vec<(InveptKind, u64)>>,
    invvpid: Vec<(InvvpidKind, u16)>,
    msr_reads: RefCell<Vec<u32>>,
    vmxon: Option<HostPhysAddr>,
    entries: Vec<bool>,
    next_exit: Option<ScriptedExit>,
    entry_error: Option<u64>,
    cpuid_ecx: u32,
    phys_bits: u32,
    /// CPUID.0AH (architectural performance monitoring); the highest basic leaf is 0AH when it is
    /// not all zero, else 0.
    leaf_a: CpuidResult,
    xcrs: Vec<(u32, u64)>,
}

impl FakeCpu {
    fn skylake(ept_cap: u64) -> Self {
        let mut msrs = HashMap::new();
        // Revision 0x10, 4096-byte regions, write-back (6 << 50), TRUE controls (bit 55).
        msrs.insert(IA32_VMX_BASIC, 0x10 | (4096u64 << 32) | (6 << 50) | (1 << 55));
        msrs.insert(IA32_FEATURE_CONTROL, 0);
        msrs.insert(IA32_VMX_TRUE_PINBASED_CTLS, (0x7fu64 << 32) | 0x16);
        msrs.insert(IA32_VMX_TRUE_PROCBASED_CTLS, (0xfff9_fffeu64 << 32) | 0x0401_e172);
        msrs.insert(IA32_VMX_PROCBASED_CTLS2, 0x0000_00ffu64 << 32);
        msrs.insert(IA32_VMX_TRUE_EXIT_CTLS, (0x003f_ffffu64 << 32) | 0x36dff);
        msrs.insert(IA32_VMX_TRUE_ENTRY_CTLS, (0xffffu64 << 32) | 0x11ff);
        msrs.insert(IA32_VMX_CR0_FIXED0, 0x8000_0021);
        msrs.insert(IA32_VMX_CR0_FIXED1, 0xffff_ffff);
        msrs.insert(IA32_VMX_CR4_FIXED0, 0x2000);
        msrs.insert(IA32_VMX_CR4_FIXED1, 0x3f_ffff);
        msrs.insert(IA32_VMX_EPT_VPID_CAP, ept_cap);
        msrs.insert(IA32_EFER, 0x500);
        // Preemption-timer rate 5, HLT activity state supported (bit 6).
        msrs.insert(IA32_VMX_MISC, (1 << 6) | 5);
        msrs.insert(crate::msr::IA32_PAT, 0x0007_0406_0007_0406);
        Self {
            msrs,
            cr0: 0x8000_0011,
            cr4: 0x20,
            vmcs: HashMap::new(),
            invept: RefCell::new(Vec::new()),
            invvpid: Vec::new(),
            msr_reads: RefCell::new(Vec::new()),
            vmxon: None,
            entries: Vec::new(),
            next_exit: None,
            entry_error: None,
            cpuid_ecx: CPUID_1_ECX_VMX,
            phys_bits: 40,
            leaf_a: CpuidResult::default(),
            xcrs: Vec::new(),
        }
    }
}

impl VmxHardware for &mut FakeCpu {
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> CpuidResult {
        match leaf {
            0 => CpuidResult { eax: if self.leaf_a == CpuidResult::default() { 1 } else { 0xa }, ..Default::default() },
            1 => CpuidResult { ecx: self.cpuid_ecx, ..Default::default() },
            0xa => self.leaf_a,
            0x8000_0000 => CpuidResult { eax: 0x8000_0008, ..Default::default() },
            0x8000_0008 => CpuidResult { eax: (48 << 8) | self.phys_bits, ..Default::default() },
            _ => CpuidResult::default(),
        }
    }
    fn read_msr(&self, msr: u32) -> u64 {
        self.msr_reads.borrow_mut().push(msr);
        *self.msrs.get(&msr).unwrap_or_else(|| panic!("#GP: RDMSR of absent MSR {msr:#x}"))
    }
    fn write_msr(&mut self, msr: u32, value: u64) {
        self.msrs.insert(msr, value);
    }
    fn read_cr0(&self) -> u64 {
        self.cr0
    }
    fn write_cr0(&mut self, value: u64) {
        self.cr0 = value;
    }
    fn read_cr4(&self) -> u64 {
        self.cr4
    }
    fn write_cr4(&mut self, value: u64) {
        self.cr4 = value;
    }
    fn xsetbv(&mut self, xcr: u32, value: u64) {
        self.xcrs.push((xcr, value));
    }
    fn host_state(&self) -> HostState {
        HostState {
            cr0: self.cr0,
            cr3: 0x10_0000,
            cr4: self.cr4,
            cs: 8,
            ds: 0x10,
            tr: 0x18,
            efer: 0x500,
            ..Default::default()
        }
    }
    fn vmxon(&mut self, region: HostPhysAddr) -> Result<(), VmFail> {
        if self.cr4 & CR4_VMXE == 0 || self.msrs[&IA32_FEATURE_CONTROL] & 5 != 5 {
            return Err(VmFail::Invalid);
        }
        self.vmxon = Some(region);
        Ok(())
    }
    fn vmclear(&mut self, _vmcs: HostPhysAddr) -> Result<(), VmFail> {
        Ok(())
    }
    fn vmptrld(&mut self, _vmcs: HostPhysAddr) -> Result<(), VmFail> {
        Ok(())
    }
    fn vmread(&self, field: F) -> Result<u64, VmFail> {
        Ok(*self.vmcs.get(&field.0).unwrap_or(&0))
    }
    fn vmwrite(&mut self, field: F, value: u64) -> Result<(), VmFail> {
        if field.is_read_only() {
            self.vmcs.insert(F::VM_INSTRUCTION_ERROR.0, 13);
            return Err(VmFail::Valid);
        }
        self.vmcs.insert(field.0, value);
        Ok(())
    }
    fn invept(&mut self, kind: InveptKind, eptp: u64) -> Result<(), VmFail> {
        self.invept.borrow_mut().push((kind, eptp));
        Ok(())
    }
    fn invvpid(&mut self, kind: InvvpidKind, vpid: u16, _linear: u64) -> Result<(), VmFail> {
        self.invvpid.push((kind, vpid));
        Ok(())
    }
    fn vm_enter(&mut self, regs: &mut GuestRegisters, resume: bool) -> Result<(), VmFail> {
        self.entries.push(resume);
        if let Some(e) = self.entry_error.take() {
            self.vmcs.insert(F::VM_INSTRUCTION_ERROR.0, e);
            return Err(VmFail::Valid);
        }
        let x = self.next_exit.take().expect("test scripted an exit");
        self.vmcs.insert(F::EXIT_REASON.0, u64::from(x.reason));
        self.vmcs.insert(F::EXIT_QUALIFICATION.0, x.qualification);
        self.vmcs.insert(F::GUEST_PHYSICAL_ADDRESS.0, x.gpa);
        self.vmcs.insert(F::GUEST_LINEAR_ADDRESS.0, x.gpa);
        regs.rax += 1;
        Ok(())
    }
}

/// A 4-level EPT in `ram` with the table options a CPU with IA32_VMX_EPT_VPID_CAP = `cap` gives
/// (hardware A/D exactly when bit 21 is set).
fn ept(ram: &HostRam, cap: u64) -> PageTable<Ept4, &HostRam> {
    PageTable::new(ram, EptCapabilities::new(cap, 40).table_options(true)).unwrap()
}

fn long_mode() -> GuestEntry {
    GuestEntry::LongMode {
        rip: GuestVirtAddr::new(0x1000),
        rsp: GuestVirtAddr::new(0x8000),
        cr3: GuestPhysAddr::new(0x2000),
    }
}

#[test]
fn controls_follow_the_allowed_settings() {
    let a = AllowedBits::from_msr((0xff00_00ffu64 << 32) | 0x0000_0016);
    assert_eq!(a.compute(ControlField::PinBased, 0x1), Ok(0x17));
    assert_eq!(
        a.compute(ControlField::PinBased, 0x100),
        Err(ControlUnsupported { field: ControlField::PinBased, missing: 0x100 })
    );
    let f = FixedBits { fixed0: 0x8000_0021, fixed1: 0xffff_ffff };
    assert_eq!(f.apply(0x11), 0x8000_0031);
    let b = VmxBasic::from_msr(0x10 | (4096u64 << 32) | (6 << 50) | (1 << 55) | (1 << 48));
    assert_eq!(
        (b.revision, b.region_size, b.memory_type, b.true_controls, b.addresses_32bit),
        (0x10, 4096, 6, true, true)
    );
}

#[test]
fn probe_reads_only_msrs_that_exist() {
    // No secondary controls: neither PROCBASED_CTLS2 nor EPT_VPID_CAP may be read.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.msrs.insert(IA32_VMX_TRUE_PROCBASED_CTLS, 0x7fff_fffeu64 << 32);
    cpu.msrs.remove(&IA32_VMX_PROCBASED_CTLS2);
    cpu.msrs.remove(&IA32_VMX_EPT_VPID_CAP);
    let caps = VmxCapabilities::probe(&&mut cpu).expect("VMX without secondary controls still probes");
    assert_eq!(caps.ept_vpid, None);
    assert_eq!(caps.require_ept(), Err(VmxUnsupported::NoSecondaryControls));
    // Secondary controls without EPT or VPID (core2_penryn-like): the EPT MSR stays unread.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.msrs.insert(IA32_VMX_PROCBASED_CTLS2, 0x0000_0081u64 << 32);
    cpu.msrs.remove(&IA32_VMX_EPT_VPID_CAP);
    let caps = VmxCapabilities::probe(&&mut cpu).unwrap();
    assert_eq!(caps.require_ept(), Err(VmxUnsupported::NoEpt));
    assert!(!cpu.msr_reads.borrow().contains(&IA32_VMX_EPT_VPID_CAP));
    // Without TRUE controls the plain MSRs are read instead.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.msrs.insert(IA32_VMX_BASIC, 0x10 | (4096u64 << 32) | (6 << 50));
    for (plain, tru) in [
        (IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS),
        (IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS),
        (IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS),
        (IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS),
    ] {
        let v = cpu.msrs.remove(&tru).unwrap();
        cpu.msrs.insert(plain, v);
    }
    assert!(VmxCapabilities::probe(&&mut cpu).is_ok());
}

#[test]
fn missing_vmx_and_locked_firmware_are_errors() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.cpuid_ecx = 0;
    assert_eq!(
        VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).err(),
        Some(VmxOnError::Unsupported(VmxUnsupported::NoVmx))
    );
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.msrs.insert(IA32_FEATURE_CONTROL, FEATURE_CONTROL_LOCK);
    assert_eq!(
        VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).err(),
        Some(VmxOnError::Unsupported(VmxUnsupported::DisabledByFirmware { feature_control: 1 }))
    );
    assert_eq!(ram.frames_in_use(), 0);
}

#[test]
fn vmxon_enables_feature_control_and_fixed_bits() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    {
        let vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        assert!(vcpu.capabilities().has_vpid());
    }
    assert_eq!(cpu.msrs[&IA32_FEATURE_CONTROL] & 5, 5);
    assert_ne!(cpu.cr4 & CR4_VMXE, 0);
    assert_eq!(cpu.cr0 & 0x20, 0x20, "CR0.NE forced by CR0_FIXED0");
    let region = cpu.vmxon.unwrap();
    assert_eq!(ram.read_u64(region.as_u64()) as u32, 0x10, "revision identifier written");
}

#[test]
fn setup_enables_ept_with_ad_on_skylake_and_without_on_sandy_bridge() {
    for (cap, ad) in [(SKYLAKE_EPT_CAP, true), (SANDY_EPT_CAP, false)] {
        let ram = HostRam::new(16);
        let mut cpu = FakeCpu::skylake(cap);
        let table = ept(&ram, cap);
        {
            let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
            vcpu.setup(&table, long_mode()).unwrap();
            assert_eq!(vcpu.ept_ad_enabled(), ad);
        }
        let eptp = cpu.vmcs[&F::EPT_POINTER.0];
        // Write-back (6), walk length 4 (3 << 3), A/D bit 6 only when offered.
        assert_eq!(eptp, table.root().as_u64() | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 });
        assert_eq!(cpu.invept.borrow().as_slice(), &[(InveptKind::SingleContext, eptp)]);
        let proc2 = cpu.vmcs[&F::SECONDARY_PROCBASED_CONTROLS.0] as u32;
        assert_ne!(proc2 & c::PROC2_ENABLE_EPT, 0);
        assert_ne!(proc2 & c::PROC2_ENABLE_VPID, 0);
        assert_eq!(proc2 & c::PROC2_UNRESTRICTED_GUEST, 0);
        assert_eq!(cpu.vmcs[&F::VPID.0], 1);
        assert_eq!(cpu.invvpid, vec![(InvvpidKind::SingleContext, 1)]);
        let proc1 = cpu.vmcs[&F::PRIMARY_PROCBASED_CONTROLS.0] as u32;
        assert_ne!(proc1 & c::PROC_HLT_EXITING, 0);
        // I/O and MSR accesses go through the bitmaps (all ones until passed through).
        assert_ne!(proc1 & c::PROC_USE_IO_BITMAPS, 0);
        assert_ne!(proc1 & c::PROC_USE_MSR_BITMAPS, 0);
        assert_ne!(proc1 & c::PROC_ACTIVATE_SECONDARY, 0);
        assert_ne!(cpu.vmcs[&F::ENTRY_CONTROLS.0] as u32 & c::ENTRY_IA32E_MODE_GUEST, 0);
        assert_eq!(cpu.vmcs[&F::GUEST_CR0.0], 0x8001_0031);
        assert_eq!(cpu.vmcs[&F::GUEST_CR4.0], 0x2020);
        assert_eq!(cpu.vmcs[&F::VMCS_LINK_POINTER.0], u64::MAX);
        assert_eq!(cpu.vmcs[&F::HOST_TR_SELECTOR.0], 0x18);
    }
}

#[test]
fn multiboot_entry_uses_unrestricted_guest() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), GuestEntry::Protected32 { eip: 0x10_000c, esp: 0 }).unwrap();
    }
    let proc2 = cpu.vmcs[&F::SECONDARY_PROCBASED_CONTROLS.0] as u32;
    assert_ne!(proc2 & c::PROC2_UNRESTRICTED_GUEST, 0);
    assert_eq!(cpu.vmcs[&F::GUEST_CR0.0] & 0x8000_0001, 1, "PE on, PG off");
    assert_eq!(cpu.vmcs[&F::ENTRY_CONTROLS.0] as u32 & c::ENTRY_IA32E_MODE_GUEST, 0);
    assert_eq!(cpu.vmcs[&F::GUEST_RIP.0], 0x10_000c);
}

#[test]
fn ept_pointer_needs_a_root_and_a_supported_walk() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP & !(1 << 6));
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    let table = ept(&ram, SKYLAKE_EPT_CAP);
    assert!(matches!(vcpu.load_ept(&table), Err(SetupError::EptPointer(_))));
    assert!(matches!(vcpu.setup(&table, long_mode()), Err(SetupError::EptPointer(_))));
    assert_eq!(vcpu.run().err(), Some(EntryError::NotSetUp));
}

#[test]
fn run_decodes_an_ept_violation_and_resumes_after_launch() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.next_exit = Some(ScriptedExit { reason: 48, qualification: 0x182, gpa: 0x40_1008 });
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    let exit = vcpu.run().unwrap();
    let VmExit::EptViolation(v) = exit else { panic!("{exit:?}") };
    assert_eq!(v.gpa, GuestPhysAddr::new(0x40_1008));
    let info = vcpu.nested_page_fault_info().unwrap();
    assert_eq!((info.fault_guest_paddr, info.access_flags), (GuestPhysAddr::new(0x40_1008), MappingFlags::WRITE));
    assert_eq!(vcpu.regs.rax, 1, "registers saved back");
    drop(vcpu);
    assert_eq!(cpu.entries, vec![false]);
}

#[test]
fn failed_launch_names_the_vm_instruction_error() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.entry_error = Some(7);
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    let Err(EntryError::Instruction(f)) = vcpu.run() else { panic!("launch should fail") };
    assert_eq!(f.instruction, "VMLAUNCH");
    assert_eq!(f.error.and_then(|e| e.name()), Some("VM entry with invalid control field(s)"));
}

#[test]
fn failed_entry_exit_is_decoded_and_not_resumed() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.next_exit = Some(ScriptedExit { reason: (1 << 31) | 33, qualification: 0, gpa: 0 });
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    assert_eq!(vcpu.run(), Ok(VmExit::EntryFailed(EntryFailure::InvalidGuestState { qualification: 0 })));
}

#[test]
fn invalidation_uses_single_context_or_falls_back_to_all_context() {
    for (cap, kind) in
        [(SKYLAKE_EPT_CAP, InveptKind::SingleContext), (SKYLAKE_EPT_CAP & !(1 << 25), InveptKind::AllContext)]
    {
        let ram = HostRam::new(16);
        let mut cpu = FakeCpu::skylake(cap);
        let table = ept(&ram, cap);
        let root = table.root();
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        vcpu.setup(&table, long_mode()).unwrap();
        assert_eq!(vcpu.invalidate(&EptInvalidation::None), Ok(None));
        assert_eq!(vcpu.invalidate(&EptInvalidation::SingleContext { root }), Ok(Some(kind)));
        // Another table's token does not touch this vCPU's EPTP.
        assert_eq!(vcpu.invalidate(&EptInvalidation::SingleContext { root: HostPhysAddr::new(0x9000) }), Ok(None));
        let eptp = vcpu.ept_pointer().unwrap().bits();
        drop(vcpu);
        assert_eq!(cpu.invept.borrow().as_slice(), &[(kind, eptp), (kind, eptp)]);
    }
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP & !(3 << 25));
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    assert_eq!(
        vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()),
        Err(SetupError::Invalidate(InvalidateError::NoInveptType))
    );
}

#[test]
fn vmcs_frame_is_freed_on_drop() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    assert_eq!(ram.frames_in_use(), 5, "VMXON region, VMCS, MSR bitmap, I/O bitmaps A and B");
    drop(vcpu);
    assert_eq!(ram.frames_in_use(), 1, "the VMXON region stays with VMX operation");
}

#[test]
fn register_numbers_follow_the_modrm_order() {
    let mut r = GuestRegisters { rcx: 7, r9: 9, ..Default::default() };
    assert_eq!(r.gpr(1), Some(7));
    assert_eq!(r.gpr(9), Some(9));
    assert_eq!(r.gpr(4), None);
    assert_eq!(r.set_gpr(4, 1), Err(BadRegister(4)));
    r.set_gpr(3, 5).unwrap();
    assert_eq!(r.rbx, 5);
}

#[test]
fn set_up_again_still_resumes_and_a_non_clear_launch_falls_back_to_resume() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
        vcpu.hw_script(ScriptedExit { reason: 12, qualification: 0, gpa: 0 });
        assert_eq!(vcpu.run(), Ok(VmExit::Hlt));
        vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
        vcpu.hw_script(ScriptedExit { reason: 18, qualification: 0, gpa: 0 });
        assert_eq!(vcpu.run(), Ok(VmExit::Vmcall));
    }
    assert_eq!(cpu.entries, vec![false, true], "VMCLEAR alone makes a VMCS clear");
    // A processor that reports "VMLAUNCH with non-clear VMCS" (error 4) gets a VMRESUME.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.entry_error = Some(4);
    cpu.next_exit = Some(ScriptedExit { reason: 12, qualification: 0, gpa: 0 });
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
        assert_eq!(vcpu.run(), Ok(VmExit::Hlt));
    }
    assert_eq!(cpu.entries, vec![false, true]);
}

impl VmxVcpu<&mut FakeCpu, &HostRam> {
    /// Scripts the next exit of the fake behind this vCPU.
    fn hw_script(&mut self, x: ScriptedExit) {
        self.hardware_mut().next_exit = Some(x);
    }
}

#[test]
fn preemption_timer_follows_the_pin_based_allowed_settings() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        assert!(vcpu.capabilities().has_preemption_timer());
        assert_eq!(vcpu.set_preemption_timer(Some(5)), Err(PreemptionTimerError::NotSetUp));
        vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
        vcpu.set_preemption_timer(Some(0x1234)).unwrap();
        assert_ne!(vcpu.vmread(F::PIN_BASED_CONTROLS).unwrap() as u32 & c::PIN_PREEMPTION_TIMER, 0);
        assert_eq!(vcpu.vmread(F::PREEMPTION_TIMER_VALUE).unwrap(), 0x1234);
        vcpu.hw_script(ScriptedExit { reason: 52, qualification: 0, gpa: 0 });
        assert_eq!(vcpu.run(), Ok(VmExit::PreemptionTimer));
        vcpu.set_preemption_timer(None).unwrap();
        assert_eq!(vcpu.vmread(F::PIN_BASED_CONTROLS).unwrap() as u32 & c::PIN_PREEMPTION_TIMER, 0);
    }
    // A CPU whose pin-based allowed-1 bits lack bit 6.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.msrs.insert(IA32_VMX_TRUE_PINBASED_CTLS, (0x3fu64 << 32) | 0x16);
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    assert!(!vcpu.capabilities().has_preemption_timer());
    assert_eq!(vcpu.set_preemption_timer(Some(1)), Err(PreemptionTimerError::NotOffered));
    assert_eq!(vcpu.set_preemption_timer(None), Ok(()));
}

#[test]
fn exception_injection_is_checked_like_vm_entry_checks_it() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    // #GP(0): vector 13, type 3, error code delivered, valid.
    vcpu.inject_exception(13, Some(0)).unwrap();
    assert_eq!(vcpu.vmread(F::ENTRY_INTERRUPTION_INFO).unwrap(), 13 | (3 << 8) | (1 << 11) | (1 << 31));
    assert_eq!(vcpu.vmread(F::ENTRY_EXCEPTION_ERROR_CODE).unwrap(), 0);
    // #UD: no error code.
    vcpu.inject_exception(6, None).unwrap();
    assert_eq!(vcpu.vmread(F::ENTRY_INTERRUPTION_INFO).unwrap(), 6 | (3 << 8) | (1 << 31));
    // Refused before they could fail an entry.
    assert_eq!(vcpu.inject_exception(32, None), Err(InjectError::BadVector(32)));
    assert_eq!(vcpu.inject_exception(255, None), Err(InjectError::BadVector(255)));
    assert_eq!(vcpu.inject_exception(2, None), Err(InjectError::BadVector(2)));
    assert_eq!(vcpu.inject_exception(6, Some(0)), Err(InjectError::ErrorCodeMismatch { vector: 6 }));
    assert_eq!(vcpu.inject_exception(14, None), Err(InjectError::ErrorCodeMismatch { vector: 14 }));
    assert_eq!(vcpu.inject_exception(13, Some(0x1_0000)), Err(InjectError::BadErrorCode(0x1_0000)));
    assert_eq!(vcpu.vmread(F::ENTRY_INTERRUPTION_INFO).unwrap(), 6 | (3 << 8) | (1 << 31), "refusals wrote nothing");
}

#[test]
fn an_event_interrupted_by_an_exit_is_queued_again() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    // Nothing was being delivered.
    assert_eq!(vcpu.reinject_interrupted_event(), Ok(false));
    assert_eq!(vcpu.vmread(F::ENTRY_INTERRUPTION_INFO).unwrap(), 0);
    // A #GP(0x18) whose delivery hit an EPT violation (the fake lets the test write the
    // read-only exit fields directly).
    vcpu.hardware_mut().vmcs.insert(F::IDT_VECTORING_INFO.0, 0x8000_0b0d);
    vcpu.hardware_mut().vmcs.insert(F::IDT_VECTORING_ERROR_CODE.0, 0x18);
    assert_eq!(vcpu.reinject_interrupted_event(), Ok(true));
    assert_eq!(vcpu.vmread(F::ENTRY_INTERRUPTION_INFO).unwrap(), 0x8000_0b0d);
    assert_eq!(vcpu.vmread(F::ENTRY_EXCEPTION_ERROR_CODE).unwrap(), 0x18);
    // INT3 (type 6) carries the instruction length.
    vcpu.hardware_mut().vmcs.insert(F::IDT_VECTORING_INFO.0, 0x8000_0603);
    vcpu.hardware_mut().vmcs.insert(F::EXIT_INSTRUCTION_LENGTH.0, 1);
    assert_eq!(vcpu.reinject_interrupted_event(), Ok(true));
    assert_eq!(vcpu.vmread(F::ENTRY_INTERRUPTION_INFO).unwrap(), 0x8000_0603);
    assert_eq!(vcpu.vmread(F::ENTRY_INSTRUCTION_LENGTH).unwrap(), 1);
}

#[test]
fn eptp_of_a_five_level_table_has_walk_length_five() {
    use twostage_npt::{Ept5, PageTable, TableOptions};
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP | (1 << 7));
    // The fake CPU's MAXPHYADDR is 40: the table must not allow wider host addresses.
    let opts = TableOptions { max_phys_bits: 40, ..TableOptions::for_format::<Ept5>() };
    let table = PageTable::<Ept5, _>::new(&ram, opts).unwrap();
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        vcpu.setup(&table, long_mode()).unwrap();
    }
    // Bits 5:3 hold the walk length minus one (Intel SDM Vol. 3C 25.6.11, Table 25-9).
    assert_eq!((cpu.vmcs[&F::EPT_POINTER.0] >> 3) & 7, 4, "a 5-level table needs a 5-level walk");
}

#[test]
fn eptp_of_a_table_with_hardware_ad_enables_ad() {
    use twostage_npt::{AdMode, Ept4, PageTable, TableOptions};
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let opts = TableOptions { ad: AdMode::Hardware, max_phys_bits: 40, ..TableOptions::for_format::<Ept4>() };
    let table = PageTable::<Ept4, _>::new(&ram, opts).unwrap();
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        vcpu.setup(&table, long_mode()).unwrap();
        let eptp = vcpu.hardware().vmcs[&F::EPT_POINTER.0];
        assert_ne!(eptp & (1 << 6), 0, "a table whose A/D the CPU keeps needs EPTP bit 6");
        assert!(vcpu.ept_ad_enabled());
        // A table without hardware A/D on the same CPU gets A/D off: no wish can disagree.
        let preset = TableOptions { ad: AdMode::Preset, ..opts };
        let plain = PageTable::<Ept4, _>::new(&ram, preset).unwrap();
        let eptp = vcpu.load_ept(&plain).unwrap();
        assert!(!eptp.accessed_dirty() && !vcpu.ept_ad_enabled());
        // A table with hardware A/D on a CPU without them is refused, not run with A/D off.
        let mut sandy = FakeCpu::skylake(SANDY_EPT_CAP);
        let mut vcpu = VmxVcpu::new(&mut sandy, &ram, VcpuConfig::default()).unwrap();
        assert_eq!(
            vcpu.setup(&table, long_mode()),
            Err(SetupError::EptPointer(twostage_npt::EptPointerError::AccessedDirtyUnsupported))
        );
    }
}

#[test]
fn invalidation_types_the_cpu_does_not_offer_are_never_issued() {
    let caps = |raw| EptCapabilities::new(raw, 40);
    // INVEPT: bit 20 (the instruction), 25 (single-context), 26 (all-context).
    assert_eq!(invept_kind(&caps(SKYLAKE_EPT_CAP)), Ok(InveptKind::SingleContext));
    assert_eq!(invept_kind(&caps(SKYLAKE_EPT_CAP & !(1 << 25))), Ok(InveptKind::AllContext));
    assert_eq!(invept_kind(&caps(SKYLAKE_EPT_CAP & !(3 << 25))), Err(InvalidateError::NoInveptType));
    assert_eq!(invept_kind(&caps(SKYLAKE_EPT_CAP & !(1 << 20))), Err(InvalidateError::NoInveptType));
    // INVVPID: bit 32 (the instruction), 41 (single-context), 42 (all-context); 40
    // (individual-address) cannot flush a whole VPID.
    assert_eq!(invvpid_kind(&caps(SKYLAKE_EPT_CAP)), Ok(InvvpidKind::SingleContext));
    assert_eq!(invvpid_kind(&caps(SKYLAKE_EPT_CAP & !(1 << 41))), Ok(InvvpidKind::AllContext));
    assert_eq!(invvpid_kind(&caps(SKYLAKE_EPT_CAP & !(3 << 41))), Err(InvalidateError::NoInvvpidType));
    assert_eq!(invvpid_kind(&caps(SKYLAKE_EPT_CAP & !(1 << 32))), Err(InvalidateError::NoInvvpidType));
}

#[test]
fn vpids_without_a_usable_invvpid_type_are_refused_before_the_vmcs_is_touched() {
    let ram = HostRam::new(16);
    // INVVPID with individual-address only (bit 40): VPID 1 could never be flushed whole.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP & !(3 << 41));
    {
        let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
        let r = vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode());
        assert_eq!(r, Err(SetupError::Invalidate(InvalidateError::NoInvvpidType)));
        assert_eq!(vcpu.run(), Err(EntryError::NotSetUp));
    }
    assert!(cpu.invvpid.is_empty() && cpu.vmcs.is_empty(), "nothing issued, nothing written");
    // Without VPIDs the same CPU runs guests.
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig { vpid: None, ..Default::default() }).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    assert_eq!(vcpu.vpid(), None);
    // Every error has a message of its own.
    let msg = SetupError::Invalidate(InvalidateError::NoInvvpidType).to_string();
    assert!(msg.contains("INVVPID") && msg.contains("41"), "{msg}");
    let e: &dyn std::error::Error = &SetupError::Invalidate(InvalidateError::NoInveptType);
    assert!(e.source().is_some_and(|s| s.to_string().contains("INVEPT")));
}

#[test]
fn an_ept_violation_during_iret_restores_blocking_by_nmi() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    // IRET from an NMI handler reads its stack frame from an unmapped page: qualification
    // bit 12 "NMI unblocking due to IRET" (Intel SDM Vol. 3C 28.2.1, Table 28-7). NMI
    // exiting and virtual NMIs are both 0 here, so the bit is defined.
    vcpu.hw_script(ScriptedExit { reason: 48, qualification: 0x181 | (1 << 12), gpa: 0x7000 });
    let VmExit::EptViolation(v) = vcpu.run().unwrap() else { panic!("not an EPT violation") };
    assert!(v.qualification.nmi_unblocking());
    // Blocking by NMI (interruptibility bit 3, Vol. 3C 25.4.2, Table 25-3) is set again, so
    // the re-executed IRET finds NMIs blocked as they were.
    assert_eq!(vcpu.vmread(F::GUEST_INTERRUPTIBILITY).unwrap() & (1 << 3), 1 << 3);
    // Without bit 12 nothing changes.
    vcpu.vmwrite(F::GUEST_INTERRUPTIBILITY, 0).unwrap();
    vcpu.hw_script(ScriptedExit { reason: 48, qualification: 0x181, gpa: 0x7000 });
    vcpu.run().unwrap();
    assert_eq!(vcpu.vmread(F::GUEST_INTERRUPTIBILITY).unwrap(), 0);
    // Bit 12 is undefined when the exit interrupted event delivery (IDT-vectoring valid).
    vcpu.hardware_mut().vmcs.insert(F::IDT_VECTORING_INFO.0, 0x8000_0b0e);
    vcpu.hw_script(ScriptedExit { reason: 48, qualification: 0x181 | (1 << 12), gpa: 0x7000 });
    vcpu.run().unwrap();
    assert_eq!(vcpu.vmread(F::GUEST_INTERRUPTIBILITY).unwrap(), 0);
}

#[test]
fn guest_cpuid_reports_the_physical_address_bits_the_ept_walk_covers() {
    let ram = HostRam::new(16);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    cpu.phys_bits = 52;
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, VcpuConfig::default()).unwrap();
    assert_eq!(vcpu.guest_cpuid(0x8000_0008, 0).eax & 0xff, 48, "before an EPT is loaded: 4-level");
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    assert_eq!(vcpu.guest_cpuid(0x8000_0008, 0).eax & 0xff, 48, "guest-physical bits above 47 would alias");
    assert_eq!(vcpu.hardware().cpuid(0x8000_0008, 0).eax & 0xff, 52);
    assert_eq!(vcpu.guest_cpuid(1, 0).ecx & CPUID_1_ECX_VMX, 0, "no VMX in the guest");
}

#[test]
fn every_public_error_says_what_went_wrong() {
    use crate::decode::DecodeError;
    use crate::emulate::EferWriteError;
    use crate::exit::VmInstructionError;
    use std::error::Error;
    let failure = VmxInstructionFailure { instruction: "INVEPT", error: Some(VmInstructionError(28)) };
    let errors: Vec<Box<dyn Error>> = vec![
        Box::new(VmxOnError::Unsupported(VmxUnsupported::NoEpt)),
        Box::new(VmxOnError::OutOfFrames),
        Box::new(VmxOnError::from(failure)),
        Box::new(SetupError::from(ControlUnsupported { field: ControlField::Entry, missing: 1 << 9 })),
        Box::new(SetupError::NeedsUnrestrictedGuest),
        Box::new(SetupError::from(InvalidateError::from(failure))),
        Box::new(PreemptionTimerError::NotOffered),
        Box::new(PreemptionTimerError::NotSetUp),
        Box::new(InjectError::BadVector(2)),
        Box::new(InjectError::ErrorCodeMismatch { vector: 14 }),
        Box::new(InjectError::ErrorCodeMismatch { vector: 6 }),
        Box::new(InjectError::BadErrorCode(0x1_0000)),
        Box::new(EntryError::NotSetUp),
        Box::new(EntryError::from(failure)),
        Box::new(BadRegister(4)),
        Box::new(DecodeError::TooLong),
        Box::new(EferWriteError::LmeWithPaging),
    ];
    let mut seen = std::collections::HashSet::new();
    for e in &errors {
        let m = e.to_string();
        assert!(m.len() > 20 && !m.contains("Instruction(") && seen.insert(m.clone()), "{m}");
    }
    // `?` carries an instruction failure into every operation error, and the chain keeps it.
    fn setup_like() -> Result<(), SetupError> {
        Err(VmxInstructionFailure { instruction: "VMWRITE", error: None })?
    }
    let e = setup_like().unwrap_err();
    assert_eq!(e.source().map(|s| s.to_string()), Some("VMWRITE failed: VMfailInvalid".into()));
    let chained = SetupError::from(InvalidateError::from(failure));
    let inner = chained.source().and_then(|s| s.source()).and_then(|s| s.source()).unwrap();
    assert!(inner.to_string().contains("invalid operand to INVEPT/INVVPID"));
}

/// A vCPU set up for a Linux-style long-mode guest on the fake CPU.
fn linux_vcpu<'a>(cpu: &'a mut FakeCpu, ram: &'a HostRam) -> VmxVcpu<&'a mut FakeCpu, &'a HostRam> {
    let mut vcpu = VmxVcpu::new(cpu, ram, VcpuConfig::default()).unwrap();
    let entry = GuestEntry::Linux64 {
        rip: GuestVirtAddr::new(0x10_0200),
        cr3: GuestPhysAddr::new(0x9000),
        gdt: GuestPhysAddr::new(0x6000),
        gdt_limit: 31,
    };
    vcpu.setup(&ept(ram, SKYLAKE_EPT_CAP), entry).unwrap();
    vcpu.hardware_mut().vmcs.insert(F::EXIT_INSTRUCTION_LENGTH.0, 3);
    vcpu
}

#[test]
fn linux_entry_uses_the_boot_selectors_and_gdt() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let vcpu = linux_vcpu(&mut cpu, &ram);
    let v = |f: F| vcpu.vmread(f).unwrap();
    assert_eq!((v(F::GUEST_CS_SELECTOR), v(F::GUEST_DS_SELECTOR), v(F::GUEST_SS_SELECTOR)), (0x10, 0x18, 0x18));
    assert_eq!((v(F::GUEST_GDTR_BASE), v(F::GUEST_GDTR_LIMIT)), (0x6000, 31));
    assert_eq!((v(F::GUEST_RIP), v(F::GUEST_CR3)), (0x10_0200, 0x9000));
    // PAT switched through the VMCS; RDTSCP enabled (the fake allows bits 7:0 of the secondary
    // controls), INVPCID and XSAVES not, so CPUID hides those two.
    assert_ne!(v(F::ENTRY_CONTROLS) as u32 & c::ENTRY_LOAD_PAT, 0);
    assert_ne!(v(F::EXIT_CONTROLS) as u32 & (c::EXIT_SAVE_PAT | c::EXIT_LOAD_PAT), 0);
    assert_eq!(v(F::GUEST_IA32_PAT), 0x0007_0406_0007_0406);
    let proc2 = v(F::SECONDARY_PROCBASED_CONTROLS) as u32;
    assert_ne!(proc2 & c::PROC2_ENABLE_RDTSCP, 0);
    assert_eq!(proc2 & (c::PROC2_ENABLE_INVPCID | c::PROC2_ENABLE_XSAVES), 0);
}

#[test]
fn bitmaps_pass_through_the_switched_msrs_only() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = linux_vcpu(&mut cpu, &ram);
    for m in crate::msr::PASSED_THROUGH {
        assert!(!vcpu.msr_exits(m, false) && !vcpu.msr_exits(m, true), "{m:#x}");
    }
    assert!(!vcpu.msr_exits(crate::msr::IA32_APIC_BASE, false));
    assert!(vcpu.msr_exits(crate::msr::IA32_APIC_BASE, true));
    assert!(vcpu.msr_exits(IA32_EFER, true) && vcpu.msr_exits(0x10a, false));
    assert!(vcpu.io_exits(0x3f8) && vcpu.io_exits(0xf4));
    vcpu.pass_through_io(0x40..0x44);
    assert!(!vcpu.io_exits(0x40) && !vcpu.io_exits(0x43) && vcpu.io_exits(0x44));
}

#[test]
fn the_pmu_msrs_cpuid_enumerates_are_passed_through() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    // Version 2, 4 general-purpose counters, 3 fixed ones.
    cpu.leaf_a = CpuidResult { eax: 0x0730_0402, edx: 0x0603, ..Default::default() };
    let mut vcpu = linux_vcpu(&mut cpu, &ram);
    for m in [0xc1, 0xc4, 0x186, 0x189, 0x309, 0x30b, 0x38d, 0x38e, 0x38f, 0x390] {
        assert!(!vcpu.msr_exits(m, false) && !vcpu.msr_exits(m, true), "{m:#x}");
    }
    // A fifth counter, a fourth fixed one, and the PMU's non-architectural MSRs still exit (#GP):
    // IA32_PERF_CAPABILITIES (345H, CPUID hides PDCM) and IA32_DEBUGCTL (1D9H).
    for m in [0xc5, 0x18a, 0x30c, 0x345, 0x1d9] {
        assert!(vcpu.msr_exits(m, false) && vcpu.msr_exits(m, true), "{m:#x}");
    }
    // Without an architectural PMU (the leaf past the highest one) nothing of it is passed through.
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = linux_vcpu(&mut cpu, &ram);
    assert!(vcpu.msr_exits(0xc1, false) && vcpu.msr_exits(0x186, true) && vcpu.msr_exits(0x38f, false));
}

#[test]
fn the_hypervisor_bit_follows_the_configuration() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let vcpu = linux_vcpu(&mut cpu, &ram);
    let bit = crate::cpuid::LEAF1_ECX_HYPERVISOR;
    assert_eq!(vcpu.guest_cpuid(1, 0).ecx & bit, bit, "on by default: the guest is told");
    drop(vcpu);
    let off = VcpuConfig { cpuid: crate::cpuid::CpuidOptions { hypervisor: false }, ..Default::default() };
    let mut vcpu = VmxVcpu::new(&mut cpu, &ram, off).unwrap();
    vcpu.setup(&ept(&ram, SKYLAKE_EPT_CAP), long_mode()).unwrap();
    let ecx = vcpu.guest_cpuid(1, 0).ecx;
    assert_eq!(ecx & bit, 0, "off: clear, as on the bare processor");
    assert_eq!(ecx & CPUID_1_ECX_VMX, 0, "VMX stays hidden");
    // The microcode signature the bare-metal path of Linux reads (write 0, CPUID, read): the
    // write is ignored, the read is the processor's.
    vcpu.hardware_mut().msrs.insert(crate::msr::IA32_BIOS_SIGN_ID, 0x2000_0065_0000_0000);
    vcpu.hardware_mut().vmcs.insert(F::EXIT_INSTRUCTION_LENGTH.0, 2);
    vcpu.regs.rcx = u64::from(crate::msr::IA32_BIOS_SIGN_ID);
    (vcpu.regs.rax, vcpu.regs.rdx) = (0, 0);
    assert_eq!(vcpu.handle_msr(true), Ok(Handled::Done));
    assert_eq!(vcpu.hardware().msrs[&crate::msr::IA32_BIOS_SIGN_ID], 0x2000_0065_0000_0000, "not written");
    assert_eq!(vcpu.handle_msr(false), Ok(Handled::Done));
    assert_eq!((vcpu.regs.rdx, vcpu.regs.rax), (0x2000_0065, 0));
}

#[test]
fn cr0_write_exit_keeps_ne_and_the_guest_reads_its_value() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = linux_vcpu(&mut cpu, &ram);
    // mov cr0, rax with CR0_STATE minus NE.
    let value = c::CR0_PE | c::CR0_MP | c::CR0_ET | c::CR0_WP | (1 << 18) | c::CR0_PG;
    vcpu.regs.rax = value;
    assert_eq!(vcpu.handle_cr_access(crate::exit::CrAccessQualification(0)), Ok(Handled::Done));
    assert_eq!(vcpu.vmread(F::GUEST_CR0).unwrap(), value | c::CR0_NE);
    assert_eq!(vcpu.vmread(F::CR0_READ_SHADOW).unwrap(), value);
    assert_eq!(vcpu.vmread(F::GUEST_RIP).unwrap(), 0x10_0203);
    // PG without PE: #GP, RIP unchanged.
    vcpu.regs.rax = c::CR0_PG;
    assert_eq!(vcpu.handle_cr_access(crate::exit::CrAccessQualification(0)), Ok(Handled::Injected(13)));
    assert_eq!(vcpu.vmread(F::GUEST_RIP).unwrap(), 0x10_0203);
    // Clearing PG needs unrestricted guest, which a long-mode entry does not use.
    vcpu.regs.rax = c::CR0_PE;
    assert!(matches!(vcpu.handle_cr_access(crate::exit::CrAccessQualification(0)), Err(HandlerError::Unsupported(_))));
    // mov cr4, rcx setting VMXE: #GP (VMX is hidden).
    vcpu.regs.rcx = c::CR4_PAE | CR4_VMXE;
    assert_eq!(vcpu.handle_cr_access(crate::exit::CrAccessQualification(0x104)), Ok(Handled::Injected(13)));
}

#[test]
fn msr_exits_follow_the_policy() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = linux_vcpu(&mut cpu, &ram);
    vcpu.regs.rcx = 0x10a; // IA32_ARCH_CAPABILITIES: not offered
    assert_eq!(vcpu.handle_msr(false), Ok(Handled::Injected(13)));
    vcpu.regs.rcx = u64::from(IA32_EFER);
    assert_eq!(vcpu.handle_msr(false), Ok(Handled::Done));
    assert_eq!(vcpu.regs.rax, vcpu.vmread(F::GUEST_IA32_EFER).unwrap());
    vcpu.regs.rax = 1 << 9; // reserved
    vcpu.regs.rdx = 0;
    assert_eq!(vcpu.handle_msr(true), Ok(Handled::Injected(13)));
    vcpu.hardware_mut().msrs.insert(crate::msr::IA32_APIC_BASE, 0xfee0_0900);
    vcpu.regs.rcx = u64::from(crate::msr::IA32_APIC_BASE);
    vcpu.regs.rax = 0xfee0_0900;
    assert_eq!(vcpu.handle_msr(true), Ok(Handled::Done), "an unchanged APIC base is accepted");
    vcpu.regs.rax = 0xfed0_0900;
    assert_eq!(vcpu.handle_msr(true), Ok(Handled::Injected(13)), "moving the APIC is not offered");
}

#[test]
fn xsetbv_is_checked_then_executed_and_hlt_waits_in_the_guest() {
    let ram = HostRam::new(64);
    let mut cpu = FakeCpu::skylake(SKYLAKE_EPT_CAP);
    let mut vcpu = linux_vcpu(&mut cpu, &ram);
    // The fake's CPUID.0DH reports nothing supported: even x87 alone is refused.
    vcpu.regs.rax = 1;
    assert_eq!(vcpu.handle_xsetbv(), Ok(Handled::Injected(13)));
    assert!(vcpu.hardware().xcrs.is_empty());
    vcpu.hardware_mut().vmcs.insert(F::GUEST_INTERRUPTIBILITY.0, 1);
    assert_eq!(vcpu.handle_hlt(), Ok(Handled::Done));
    assert_eq!(vcpu.vmread(F::GUEST_ACTIVITY_STATE).unwrap(), 1);
    assert_eq!(vcpu.vmread(F::GUEST_INTERRUPTIBILITY).unwrap(), 0);
}
