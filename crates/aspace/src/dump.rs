//! A readable map of an address space: regions, backends, and the pages that back them.
#![forbid(unsafe_code)]

use crate::region::Backend;
use crate::space::AddressSpace;
use core::fmt;
use twostage_npt::{Format, FrameAllocator, PageSize};

impl<F: Format, A: FrameAllocator + Clone> fmt::Display for AddressSpace<F, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "address space ({}, root {}): {} region(s), {} data frame(s) counted, {} table frame(s)",
            F::NAME,
            self.root(),
            self.regions.len(),
            self.refs.frames(),
            self.table.table_frames()
        )?;
        for r in self.regions.values() {
            write!(
                f,
                "  {:<34} {:<10} {:<13} #{:<3} {:<12}",
                r.range.to_string_padded(),
                r.flags,
                r.backend.name(),
                r.id.as_u32(),
                r.name
            )?;
            if let Backend::Linear { host } = r.backend {
                write!(f, " -> {host}")?;
            }
            if r.backend != Backend::Mmio {
                let mut count = [0u64; 4];
                let (mut shared, mut ro) = (0u64, 0u64);
                self.table.for_each_leaf(r.range.start, r.range.len(), |leaf| {
                    count[leaf.size.level()] += 1;
                    if r.backend.owns_frames() && self.refs.count(leaf.hpa) > 1 {
                        shared += 1;
                    }
                    if r.flags.contains(twostage_npt::MappingFlags::WRITE)
                        && !leaf.flags.contains(twostage_npt::MappingFlags::WRITE)
                    {
                        ro += 1;
                    }
                });
                let total_pages = r.range.len() / crate::space::PAGE;
                let mapped: u64 =
                    PageSize::ALL.iter().map(|s| count[s.level()] * (s.bytes() / crate::space::PAGE)).sum();
                write!(f, " mapped {mapped}/{total_pages} pages:")?;
                let mut any = false;
                for s in PageSize::ALL.iter().rev() {
                    if count[s.level()] > 0 {
                        write!(f, " {}x{}", count[s.level()], s)?;
                        any = true;
                    }
                }
                if !any {
                    f.write_str(" none")?;
                }
                if shared > 0 {
                    write!(f, ", {shared} shared")?;
                }
                if ro > 0 {
                    write!(f, ", {ro} write-protected")?;
                }
            }
            writeln!(f)?;
        }
        if let Some(log) = &self.dirty {
            writeln!(f, "  dirty log on {} ({:?})", log.range(), log.mode)?;
        }
        Ok(())
    }
}

trait Padded {
    fn to_string_padded(&self) -> alloc::string::String;
}

impl Padded for twostage_npt::GpaRange {
    fn to_string_padded(&self) -> alloc::string::String {
        alloc::format!("{self}")
    }
}
