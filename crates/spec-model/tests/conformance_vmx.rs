//! kvm-unit-tests x86/vmx_tests.c on the spec model: `test_ept_eptp` (the EPTP VM-entry checks),
//! "EPT - unsupported INVEPT", `invvpid_test`'s operand checks; and the effective memory type
//! under EPT (Intel SDM Vol. 3C 29.3.7.2 with Vol. 3A Table 11-7). See docs/conformance.md.

use twostage_spec_model::ept::{EptCaps, EptMemType, Eptp, EptpError};
use twostage_spec_model::memtype::{self, MemoryType, PatType};
use twostage_spec_model::tlb::operands::{self, invept_type, invvpid_type, InvalidOperand};

const SKYLAKE_X: u64 = 0xf0106334141;
const SANDY_BRIDGE: u64 = 0xf0106114141;

/// kvm-unit-tests' EPTP after `setup_dummy_ept()`: root 0, WB, 4-level, A/D off.
const DUMMY: u64 = 6 | 3 << 3;

/// test_ept_eptp: memory type (bits 2:0) valid only for UC with cap bit 8 and WB with bit 14.
#[test]
fn test_ept_eptp_memory_type() {
    for cap in [SKYLAKE_X, SANDY_BRIDGE, SKYLAKE_X & !(1 << 8), SKYLAKE_X & !(1 << 14)] {
        let caps = EptCaps::from_msr(cap, 46);
        for mt in 0..8u64 {
            let supported = (mt == 0 && cap & 1 << 8 != 0) || (mt == 6 && cap & 1 << 14 != 0);
            let r = Eptp::decode((DUMMY & !7) | mt, &caps);
            assert_eq!(r.is_ok(), supported, "cap {cap:#x} memory type {mt}: {r:?}");
            if !supported {
                assert_eq!(r, Err(EptpError::MemoryType(mt as u8)));
            }
        }
    }
}

/// test_ept_eptp: page-walk length minus one (bits 5:3) valid only for 3, or 4 with cap bit 7.
#[test]
fn test_ept_eptp_walk_length() {
    for cap in [SKYLAKE_X, SKYLAKE_X | 1 << 7] {
        let caps = EptCaps::from_msr(cap, 46);
        for wl in 0..8u64 {
            let valid = wl == 3 || (wl == 4 && cap & 1 << 7 != 0);
            let r = Eptp::decode((DUMMY & !(7 << 3)) | wl << 3, &caps);
            assert_eq!(r.is_ok(), valid, "cap {cap:#x} walk length - 1 = {wl}: {r:?}");
        }
    }
}

/// test_ept_eptp: bit 6 (A/D) is refused exactly when cap bit 21 is clear.
#[test]
fn test_ept_eptp_accessed_dirty_flag() {
    for (cap, has_ad) in [(SKYLAKE_X, true), (SANDY_BRIDGE, false)] {
        let caps = EptCaps::from_msr(cap, 46);
        assert!(Eptp::decode(DUMMY, &caps).is_ok());
        let r = Eptp::decode(DUMMY | 1 << 6, &caps);
        assert_eq!(r.is_ok(), has_ad, "cap {cap:#x}: {r:?}");
        if !has_ad {
            assert_eq!(r, Err(EptpError::AccessedDirtyUnsupported));
        }
    }
}

/// test_ept_eptp: reserved bits 11:7 (every non-zero value of the 5-bit field) and 63:N for the
/// processor's MAXPHYADDR (bit N-1 is part of the address and valid).
#[test]
fn test_ept_eptp_reserved_bits() {
    for maxphyaddr in [36u8, 39, 46, 52] {
        let caps = EptCaps::from_msr(SKYLAKE_X, maxphyaddr);
        for field in 0..32u64 {
            let r = Eptp::decode(DUMMY | field << 7, &caps);
            assert_eq!(r.is_ok(), field == 0, "bits 11:7 = {field:#x}: {r:?}");
        }
        for bit in maxphyaddr - 1..=63 {
            let r = Eptp::decode(DUMMY | 1 << bit, &caps);
            assert_eq!(r.is_ok(), bit < maxphyaddr, "MAXPHYADDR {maxphyaddr}, bit {bit}: {r:?}");
        }
    }
}

/// "EPT - unsupported INVEPT": type 0 fails; types 1 and 2 follow cap bits 25 and 26; a
/// single-context INVEPT with an EPTP that VM entry would refuse fails too.
#[test]
fn ept_unsupported_invept() {
    let caps = EptCaps::from_msr(SKYLAKE_X, 46);
    let eptp = 0x12_3000 | DUMMY;
    assert_eq!(operands::invept(0, eptp, &caps), Err(InvalidOperand::Type(0)));
    for kind in [3, 4, 0xff, u64::MAX] {
        assert_eq!(operands::invept(kind, eptp, &caps), Err(InvalidOperand::Type(kind)));
    }
    assert_eq!(operands::invept(invept_type::SINGLE_CONTEXT, eptp, &caps), Ok(()));
    assert_eq!(operands::invept(invept_type::ALL_CONTEXT, eptp, &caps), Ok(()));
    let no_single = EptCaps::from_msr(SKYLAKE_X & !(1 << 25), 46);
    assert_eq!(operands::invept(invept_type::SINGLE_CONTEXT, eptp, &no_single), Err(InvalidOperand::Type(1)));
    assert_eq!(operands::invept(invept_type::ALL_CONTEXT, eptp, &no_single), Ok(()));
    assert_eq!(
        operands::invept(invept_type::SINGLE_CONTEXT, eptp | 1 << 8, &caps),
        Err(InvalidOperand::Eptp(EptpError::ReservedBits(1 << 8)))
    );
    // All-context does not look at the descriptor.
    assert_eq!(operands::invept(invept_type::ALL_CONTEXT, u64::MAX, &caps), Ok(()));
    assert_eq!(operands::invept(1, eptp, &EptCaps::from_msr(0, 46)), Err(InvalidOperand::Unsupported));
}

/// kvm-unit-tests' `invvpid_valid`, applied to the same operand sweeps as `invvpid_test`.
fn kut_invvpid_valid(caps: u64, kind: u64, vpid: u64, gla: u64) -> bool {
    let supported = kind <= 3 && caps & 1 << (40 + kind) != 0;
    let canonical = ((gla << 16) as i64 >> 16) as u64 == gla;
    supported
        && vpid >> 16 == 0
        && (kind == invvpid_type::ALL_CONTEXT || vpid != 0)
        && (kind != invvpid_type::INDIVIDUAL_ADDRESS || canonical)
}

#[test]
fn invvpid_test_operands() {
    const NONCANONICAL: u64 = 0xaaaa_aaaa_aaaa_aaaa;
    // Bochs offers all four types (bits 40-43 of 0xf0106334141); also a CPU without type 3.
    for cap in [SKYLAKE_X, SKYLAKE_X & !(1 << 43)] {
        let caps = EptCaps::from_msr(cap, 46);
        let check = |kind: u64, vpid: u64, gla: u64| {
            let model = operands::invvpid(kind, vpid, gla, 48, &caps);
            assert_eq!(model.is_ok(), kut_invvpid_valid(cap, kind, vpid, gla), "type {kind} vpid {vpid:#x}: {model:?}");
        };
        for kind in -127i64..128 {
            check(kind as u64, 0xffff, 0);
        }
        for i in 0..64 {
            for kind in 0..4 {
                check(kind, 1 << i, 0);
            }
        }
        for kind in 0..4 {
            check(kind, 0, 0);
        }
        check(invvpid_type::INDIVIDUAL_ADDRESS, 0xffff, NONCANONICAL);
        // The address is looked at only by the individual-address type.
        check(invvpid_type::SINGLE_CONTEXT, 0xffff, NONCANONICAL);
    }
    let caps = EptCaps::from_msr(SKYLAKE_X, 46);
    assert_eq!(operands::invvpid(1, 0, 0, 48, &caps), Err(InvalidOperand::VpidZero));
    assert_eq!(operands::invvpid(1, 1 << 16, 0, 48, &caps), Err(InvalidOperand::VpidReserved(1)));
    assert_eq!(operands::invvpid(0, 1, 1 << 47, 48, &caps), Err(InvalidOperand::NonCanonical(1 << 47)));
    assert_eq!(operands::invvpid(0, 1, 1 << 47, 57, &caps), Ok(()), "canonical with 5-level paging");
    assert_eq!(operands::invvpid(1, 1, 0, 48, &EptCaps::from_msr(0x6334141, 46)), Err(InvalidOperand::Unsupported));
}

/// Table 11-7, row by row, with the EPT memory type in the MTRR's place (29.3.7.2).
#[test]
fn effective_memory_type_follows_table_11_7() {
    use MemoryType::{Uc, Wb, Wc, Wp, Wt};
    // Columns: PAT UC, UC-, WC, WT, WB, WP.
    let pats = [PatType::Uc, PatType::UcMinus, PatType::Wc, PatType::Wt, PatType::Wb, PatType::Wp];
    let rows: [(EptMemType, [MemoryType; 6]); 5] = [
        (EptMemType::Uc, [Uc, Uc, Wc, Uc, Uc, Uc]),
        (EptMemType::Wc, [Uc, Wc, Wc, Uc, Wc, Uc]),
        (EptMemType::Wt, [Uc, Uc, Wc, Wt, Wt, Wp]),
        (EptMemType::Wp, [Uc, Wc, Wc, Wt, Wp, Wp]),
        (EptMemType::Wb, [Uc, Uc, Wc, Wt, Wb, Wp]),
    ];
    for (ept, row) in rows {
        for (pat, want) in pats.iter().zip(row) {
            assert_eq!(memtype::effective(false, ept, false, *pat), want, "EPT {ept:?}, PAT {pat:?}");
            // Ignore-PAT: the EPT type alone; CR0.CD: UC.
            assert_eq!(memtype::effective(false, ept, true, *pat), MemoryType::from(ept));
            assert_eq!(memtype::effective(true, ept, true, *pat), Uc);
        }
    }
    assert_eq!(PatType::from_bits(7), Some(PatType::UcMinus));
    assert_eq!(PatType::from_bits(2), None);
}
