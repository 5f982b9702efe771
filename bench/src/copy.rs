//! Copy rows: guest memory by guest-physical address against vm-memory and plain memcpy.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use twostage_aspace::GuestMemory;
use twostage_npt::GuestPhysAddr;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::engine::GPA_BASE;
use crate::space::{ts_linear, ts_populated};
use crate::{ram, random_offsets, MIB};

/// Bytes of guest RAM the copies land in.
pub const COPY_SPAN: u64 = 256 * MIB;
/// Copy sizes, with the labels used in the benchmark ids.
pub const SIZES: [(&str, u64); 4] = [("8B", 8), ("4K", 4096), ("64K", 64 << 10), ("1M", 1 << 20)];
/// Offsets cycled through by each row.
const OFFSETS: usize = 1024;

/// Which way the bytes go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Guest to hypervisor buffer (`copy_from_guest`).
    Read,
    /// Hypervisor buffer to guest (`copy_to_guest`).
    Write,
}

impl Dir {
    /// Label in group names.
    pub fn label(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

/// vm-memory's guest memory over `len` bytes of the bench RAM from host-physical `pa`, at
/// [`GPA_BASE`]: the same host bytes as a [`crate::space::ts_linear`] space, so that both sides
/// copy to and from identical memory (same backing, same contiguity, same huge pages).
pub fn vmm_over(ram: &'static crate::ram::BenchRam, pa: u64, len: u64) -> GuestMemoryMmap {
    // PROT_READ | PROT_WRITE and MAP_PRIVATE | MAP_ANONYMOUS (Linux values): how the bench RAM's
    // block was mapped by the global allocator; vm-memory only records them.
    const PROT_RW: i32 = 0x3;
    const MAP_PRIVATE_ANON: i32 = 0x22;
    // SAFETY: `ram.ptr(pa)..+len` lies inside the bench RAM's block, which is leaked (lives for
    // the whole process) and page-aligned there (`pa` is frame-aligned, the block 2 MiB-aligned);
    // vm-memory does not unmap a raw mapping it did not create.
    let region = unsafe { MmapRegion::build_raw(ram.ptr(pa), len as usize, PROT_RW, MAP_PRIVATE_ANON) }.expect("raw");
    let region = GuestRegionMmap::new(region, GuestAddress(GPA_BASE)).expect("region");
    GuestMemoryMmap::from_regions(vec![region]).expect("one region")
}

/// Group settings for a copy row.
pub fn copy_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    size: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(size));
    g
}

/// Plain memcpy between a buffer and a `COPY_SPAN` block at the same offsets: the limit.
pub fn memcpy_row(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dir: Dir,
    label: &str,
    size: u64,
    offs: &[u64],
    ram: &mut [u8],
) {
    let mut buf = vec![0x5au8; size as usize];
    g.bench_function(BenchmarkId::new("memcpy", label), |b| {
        let mut i = 0;
        b.iter(|| {
            let off = black_box(offs[i % OFFSETS]) as usize;
            i += 1;
            match dir {
                Dir::Read => buf.copy_from_slice(&ram[off..off + size as usize]),
                Dir::Write => ram[off..off + size as usize].copy_from_slice(&buf),
            }
            black_box(&buf);
        })
    });
}

/// GPA copies of every size in both directions: twostage over a linear region of the bench RAM
/// (`twostage`) and over a populated demand-zero region (`twostage-dz`), vm-memory
/// (`GuestMemoryMmap` over the same host bytes as the linear region: like with like;
/// `read_obj`/`write_obj` for the 8-byte object, `read_slice`/`write_slice` otherwise) and memcpy
/// (the same bytes again).
pub fn gpa_copies(c: &mut Criterion) {
    let ram = ram();
    let mut dz = ts_populated(ram, COPY_SPAN);
    let (mut space, host) = ts_linear(ram, COPY_SPAN);
    let vmm = vmm_over(ram, host, COPY_SPAN);
    // SAFETY: the linear region's bytes, in the leaked bench RAM; the three sides take turns.
    let plain = unsafe { std::slice::from_raw_parts_mut(ram.ptr(host), COPY_SPAN as usize) };
    for dir in [Dir::Read, Dir::Write] {
        for (label, size) in SIZES {
            let offs = random_offsets(0xc0c0 ^ size, COPY_SPAN, size, OFFSETS);
            let mut g = copy_group(c, &format!("gpa_{}", dir.label()), size);
            let mut buf = vec![0x5au8; size as usize];
            for (name, space) in [("twostage", &mut space), ("twostage-dz", &mut dz)] {
                g.bench_function(BenchmarkId::new(name, label), |b| {
                    let mut i = 0;
                    b.iter(|| {
                        let gpa = GuestPhysAddr::new(GPA_BASE + black_box(offs[i % OFFSETS]));
                        i += 1;
                        match dir {
                            Dir::Read => space.read(gpa, &mut buf).expect("read"),
                            Dir::Write => {
                                space.write(gpa, &buf).expect("write");
                                space.flush_pending(|_| {});
                            }
                        }
                        black_box(&buf);
                    })
                });
            }
            g.bench_function(BenchmarkId::new("vm-memory", label), |b| {
                let mut i = 0;
                b.iter(|| {
                    let addr = GuestAddress(GPA_BASE + black_box(offs[i % OFFSETS]));
                    i += 1;
                    match (dir, size) {
                        (Dir::Read, 8) => {
                            let v: u64 = vmm.read_obj(addr).expect("read");
                            buf.copy_from_slice(&v.to_ne_bytes());
                        }
                        (Dir::Write, 8) => vmm
                            .write_obj(u64::from_ne_bytes(buf[..8].try_into().expect("8 bytes")), addr)
                            .expect("write"),
                        (Dir::Read, _) => vmm.read_slice(&mut buf, addr).expect("read"),
                        (Dir::Write, _) => vmm.write_slice(&buf, addr).expect("write"),
                    }
                    black_box(&buf);
                })
            });
            memcpy_row(&mut g, dir, label, size, &offs, plain);
            g.finish();
        }
    }
}
