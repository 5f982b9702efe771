//! The multiboot header check, the guest's boot information and the command line.

mod common;
use common::*;
use twostage_baremetal::elf::{LoadError, Machine};
use twostage_baremetal::multiboot::{
    cmdline_arg, find_header, guest_information, plan_guest, GuestError, Header, HeaderError, GUEST_INFO_LEN,
    HEADER_MAGIC,
};

/// `len` bytes with a header (magic, `flags`, `checksum`) at `at`.
fn file(len: usize, at: usize, flags: u32, checksum: u32) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[at..at + 4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
    f[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
    f[at + 8..at + 12].copy_from_slice(&checksum.to_le_bytes());
    f
}

fn good(len: usize, at: usize, flags: u32) -> Vec<u8> {
    file(len, at, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags))
}

#[test]
fn a_valid_header_is_found() {
    assert_eq!(find_header(&good(0x2000, 0x1000, 3)), Ok(Header { offset: 0x1000, flags: 3 }));
    assert_eq!(find_header(&good(12, 0, 0)), Ok(Header { offset: 0, flags: 0 }));
    // The last place it may be: ending at byte 8192.
    assert_eq!(find_header(&good(0x4000, 8192 - 12, 2)), Ok(Header { offset: 8180, flags: 2 }));
    // Optional flags 17-31 are ignored.
    assert_eq!(find_header(&good(64, 0, 3 | 1 << 20)).map(|h| h.flags), Ok(3 | 1 << 20));
}

#[test]
fn a_missing_header_is_refused() {
    assert_eq!(find_header(&[]), Err(HeaderError::NotFound { searched: 0 }));
    assert_eq!(find_header(&[0; 0x4000]), Err(HeaderError::NotFound { searched: 8192 }));
    // Past the first 8192 bytes, unaligned, or cut by the end of the file.
    assert_eq!(find_header(&good(0x4000, 8184, 0)), Err(HeaderError::NotFound { searched: 8192 }));
    assert_eq!(find_header(&good(0x1000, 2, 0)), Err(HeaderError::NotFound { searched: 0x1000 }));
    assert_eq!(find_header(&good(20, 0, 0)[..8]), Err(HeaderError::NotFound { searched: 8 }));
    let msg = HeaderError::NotFound { searched: 8192 }.to_string();
    assert_eq!(
        msg,
        "no multiboot header: the magic 0x1badb002 is not at any 4-byte boundary of the file's first 8192 bytes"
    );
}

#[test]
fn a_bad_checksum_is_refused_unless_a_good_header_follows() {
    let f = file(64, 8, 3, 0x1234);
    let err = find_header(&f).unwrap_err();
    assert_eq!(err, HeaderError::BadChecksum { offset: 8, flags: 3, checksum: 0x1234 });
    assert_eq!(
        err.to_string(),
        "the multiboot header at offset 0x8 has a bad checksum: magic 0x1badb002 + flags 0x3 + checksum 0x1234 = \
         0x1badc239, not 0"
    );
    // GRUB takes the first magic whose checksum is right.
    let mut f = file(64, 8, 3, 0x1234);
    f[32..44].copy_from_slice(&good(12, 0, 2));
    assert_eq!(find_header(&f), Ok(Header { offset: 32, flags: 2 }));
}

#[test]
fn flags_this_loader_cannot_honour_are_refused() {
    let err = find_header(&good(64, 0, 1 << 2 | 3)).unwrap_err();
    assert_eq!(err, HeaderError::UnsupportedFlags { offset: 0, flags: 7, unsupported: 4 });
    assert_eq!(
        err.to_string(),
        "the multiboot header at offset 0x0 (flags 0x7) asks for video mode information (flag 2); this loader \
         provides only page-aligned modules (flag 0) and memory information (flag 1)"
    );
    let err = find_header(&good(64, 4, 1 << 16 | 1 << 9)).unwrap_err();
    assert_eq!(err, HeaderError::UnsupportedFlags { offset: 4, flags: 0x10200, unsupported: 0x10200 });
    let msg = err.to_string();
    assert!(msg.contains("requirement flag 9, which the specification does not define, load addresses"), "{msg}");
    assert!(msg.contains("(flag 16, a.out kludge)"), "{msg}");
}

#[test]
fn the_guest_information_describes_ram_and_points_at_its_map() {
    let b = guest_information(0x1000, 16 << 20);
    let rd = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let rd64 = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(rd(0), 1 | 1 << 6);
    assert_eq!((rd(4), rd(8)), (639, 15 * 1024));
    assert_eq!((rd(44), rd(48)), (72, 0x1038));
    let map: Vec<(u32, u64, u64, u32)> =
        (0..3).map(|i| 56 + 24 * i).map(|e| (rd(e), rd64(e + 4), rd64(e + 12), rd(e + 20))).collect();
    assert_eq!(map, [(20, 0, 0x9_fc00, 1), (20, 0x9_fc00, 0x400, 2), (20, 0x10_0000, 15 << 20, 1)]);
    assert_eq!(56 + 72, GUEST_INFO_LEN);
}

#[test]
fn command_line_words() {
    let c = b"/boot/hv.elf guest=/boot/guest.elf quiet";
    assert_eq!(cmdline_arg(c, "guest"), Some(&b"/boot/guest.elf"[..]));
    assert_eq!(cmdline_arg(c, "quiet"), Some(&b""[..]));
    assert_eq!(cmdline_arg(c, "gues"), None);
    assert_eq!(cmdline_arg(b"", "guest"), None);
    assert_eq!(cmdline_arg(b"xguest=1", "guest"), None);
}

const RAM: u64 = 16 << 20;

/// An ELF32 i386 multiboot guest: code at 1 MiB from file offset 0x100, starting with a header
/// with `flags`, plus the segments `more`.
fn guest(flags: u32, more: &[Ph]) -> Vec<u8> {
    let mut phs = vec![load(0x10_0000, 0x100, 0x100, 0x1000)];
    phs.extend_from_slice(more);
    let mut e = Elf::new(EM_386, 0x10_000c, &phs);
    e.class64 = false;
    let mut f = e.build();
    f[0x100..0x10c].copy_from_slice(&good(12, 0, flags));
    f
}

#[test]
fn a_multiboot_guest_plans_with_its_information_where_no_segment_is() {
    let f = guest(3, &[]);
    let plan = plan_guest(&f, RAM).unwrap();
    assert_eq!((plan.load.entry, plan.header, plan.info_at), (0x10_000c, Header { offset: 0x100, flags: 3 }, 0x1000));
    // Guest data where the information used to go (0x9000) is left alone: it goes below.
    let f = guest(3, &[load(0x9000, 0x200, 0x200, 0x200)]);
    assert_eq!(plan_guest(&f, RAM).unwrap().info_at, 0x1000);
    // Conventional memory taken: above the guest's segments past 1 MiB.
    let f = guest(3, &[load(0, 0x200, 0x10, 0xa_0000)]);
    assert_eq!(plan_guest(&f, RAM).unwrap().info_at, 0x10_1000);
    let f = guest(3, &[load(0x1000, 0x200, 0x10, 0x9_f000)]);
    assert_eq!(plan_guest(&f, RAM).unwrap().info_at, 0x10_1000);
    // Nowhere: refused.
    let f = guest(3, &[load(0, 0x200, 0x10, 0x10_0000), load(0x10_1000, 0x200, 0x10, RAM - 0x10_1000)]);
    let err = plan_guest(&f, RAM).unwrap_err();
    assert_eq!(err, GuestError::Load(LoadError::NoRoomFor { what: "multiboot information", size: 128 }));
    assert!(err.to_string().starts_with("no room for the multiboot information (0x80 bytes)"));
}

#[test]
fn a_multiboot_guest_is_refused_for_its_elf_first_then_its_header() {
    let mut f = guest(3, &[]);
    f[18..20].copy_from_slice(&EM_RISCV.to_le_bytes());
    let err = plan_guest(&f, RAM).unwrap_err();
    assert_eq!(err, GuestError::Load(LoadError::WrongMachine { found: EM_RISCV, expected: Machine::X86 }));
    assert_eq!(
        err.to_string(),
        "the file is for RISC-V (e_machine 243), but this hypervisor runs x86 (ELF32 with e_machine 3 or ELF64 with \
         e_machine 62) guests"
    );
    assert_eq!(plan_guest(&[], RAM), Err(GuestError::Load(LoadError::Empty)));
    let mut f = guest(3, &[]);
    f[0x100..0x104].fill(0);
    let err = plan_guest(&f, RAM).unwrap_err();
    assert_eq!(err, GuestError::Header(HeaderError::NotFound { searched: 0x1000 }));
    let mut f = guest(3, &[]);
    f[0x108] ^= 1;
    assert!(matches!(plan_guest(&f, RAM), Err(GuestError::Header(HeaderError::BadChecksum { offset: 0x100, .. }))));
    let f = guest(3 | 1 << 16, &[]);
    assert!(matches!(plan_guest(&f, RAM), Err(GuestError::Header(HeaderError::UnsupportedFlags { .. }))));
    // Segments past guest RAM, and overlapping ones, as for any ELF.
    let f = guest(3, &[load(RAM - 0x1000, 0x200, 0x10, 0x2000)]);
    assert!(matches!(plan_guest(&f, RAM), Err(GuestError::Load(LoadError::SegmentOutsideRam { index: 1, .. }))));
    let f = guest(3, &[load(0x10_0800, 0x200, 0x10, 0x10)]);
    assert!(matches!(plan_guest(&f, RAM), Err(GuestError::Load(LoadError::Overlap { first: 0, second: 1, .. }))));
    let e: &dyn std::error::Error = &err;
    assert!(e.source().is_some());
}
