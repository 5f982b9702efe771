//! The multiboot header check, the guest's boot information and the command line.

use twostage_baremetal::multiboot::{
    cmdline_arg, find_header, guest_information, Header, HeaderError, GUEST_INFO_LEN, HEADER_MAGIC,
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
