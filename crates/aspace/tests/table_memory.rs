//! A bare nested table as guest memory: copies follow the table across discontiguous pages,
//! rights are checked as the guest's would be, and a refused access changes nothing.

mod common;
use common::*;
use twostage_aspace::{GuestMemError, GuestMemory, TableMemory};
use twostage_npt::{Access, FrameAllocator, MapSize, MappingFlags, PageSize, PageTable, Sv39x4};
use twostage_npt::{Ept4, TableOptions};

#[test]
fn copies_follow_the_table_and_check_rights() {
    let ram = ram(64);
    let mut t = PageTable::<Sv39x4, Ram>::new(ram.clone(), TableOptions::for_format::<Sv39x4>()).unwrap();
    let (a, b) = (ram.allocate_frame().unwrap(), ram.allocate_frame().unwrap());
    for (i, h) in [a, b].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..4096u32).map(|x| (x as u8) ^ (i as u8 * 91)).collect();
        ram.write_bytes(h.as_u64(), &bytes);
    }
    // GPA 0x8000_0000 -> b, 0x8000_1000 -> a (read-only): in the opposite order in host memory.
    let one = MapSize::Exactly(PageSize::Size4K);
    let f = t.map(gpa(0x8000_0000), b, 4096, MappingFlags::RW, one).unwrap();
    t.flush(f, |_| {}).unwrap();
    let f = t.map(gpa(0x8000_1000), a, 4096, MappingFlags::READ, one).unwrap();
    t.flush(f, |_| {}).unwrap();
    // SAFETY: the table maps only frames of `ram`, which its `phys_to_virt` reaches; no
    // reference aliases them.
    let mut m = unsafe { TableMemory::new(&t) };
    let mut buf = [0u8; 32];
    m.read(gpa(0x8000_0ff0), &mut buf).unwrap();
    let mut want = [0u8; 32];
    ram.read_bytes(b.as_u64() + 0xff0, &mut want[..16]);
    ram.read_bytes(a.as_u64(), &mut want[16..]);
    assert_eq!(buf, want);
    // A write reaching into the read-only page is refused before any byte moves.
    let before: u64 = m.read_obj(gpa(0x8000_0ff8)).unwrap();
    let e = m.write(gpa(0x8000_0ffc), &[9; 8]).unwrap_err();
    assert_eq!(
        e,
        GuestMemError::Forbidden { gpa: gpa(0x8000_1000), access: Access::Write, rights: MappingFlags::READ }
    );
    assert_eq!(m.read_obj::<u64>(gpa(0x8000_0ff8)).unwrap(), before, "nothing written");
    m.write_obj(gpa(0x8000_0ff8), &0x1122_3344_5566_7788u64).unwrap();
    assert_eq!(ram.read_u64(b.as_u64() + 0xff8), 0x1122_3344_5566_7788);
    assert_eq!(m.compare_exchange_u64(gpa(0x8000_0ff8), 0x1122_3344_5566_7788, 5).unwrap(), Ok(0x1122_3344_5566_7788));
    assert_eq!(m.compare_exchange_u64(gpa(0x8000_0ff8), 0, 6).unwrap(), Err(5));
    assert_eq!(
        m.compare_exchange_u64(gpa(0x8000_1000), 0, 6),
        Err(GuestMemError::Forbidden { gpa: gpa(0x8000_1000), access: Access::Write, rights: MappingFlags::READ })
    );
    assert_eq!(
        m.compare_exchange_u64(gpa(0x8000_0004), 0, 6),
        Err(GuestMemError::Misaligned { gpa: gpa(0x8000_0004) })
    );
    // Past the mapping, and past the top of the guest-physical space.
    let e = m.read(gpa(0x8000_1ff8), &mut buf).unwrap_err();
    assert_eq!(e, GuestMemError::Unmapped { gpa: gpa(0x8000_2000), access: Access::Read });
    let top = gpa((1 << 59) - 4);
    assert_eq!(m.read(top, &mut buf), Err(GuestMemError::Overflow { gpa: top, len: 32 }));
    // Execute needs the execute right.
    assert!(matches!(m.read_as(gpa(0x8000_0000), &mut buf, Access::Execute), Err(GuestMemError::Forbidden { .. })));
    let f = t.unmap(gpa(0x8000_0000), 0x2000).unwrap();
    t.flush(f, |_| {}).unwrap();
    // SAFETY: `a` and `b` came from `ram` and are no longer mapped.
    unsafe {
        ram.deallocate_frames(a, 1);
        ram.deallocate_frames(b, 1);
    }
}

#[test]
fn huge_leaves_and_ept_work_too() {
    let ram = ram(1200);
    let opts = TableOptions::for_format::<Ept4>();
    let mut t = PageTable::<Ept4, Ram>::new(ram.clone(), opts).unwrap();
    let h = ram.allocate_frames(512, 512).unwrap();
    let f = t.map(gpa(0x20_0000), h, 2 << 20, MappingFlags::RW, MapSize::Exactly(PageSize::Size2M)).unwrap();
    t.flush(f, |_| {}).unwrap();
    // SAFETY: as above.
    let mut m = unsafe { TableMemory::new(&t) };
    let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 253) as u8).collect();
    m.write(gpa(0x20_0ff0), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    m.read(gpa(0x20_0ff0), &mut back).unwrap();
    assert_eq!(back, data);
    let mut first = [0u8; 4];
    ram.read_bytes(h.as_u64() + 0xff0, &mut first);
    assert_eq!(first, data[..4]);
    let f = t.unmap(gpa(0x20_0000), 2 << 20).unwrap();
    t.flush(f, |_| {}).unwrap();
    // SAFETY: unmapped, from `ram`.
    unsafe { ram.deallocate_frames(h, 512) };
}
