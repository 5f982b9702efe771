//! A text map of a nested table: runs of like leaves, one line each.

use super::{Leaf, PageTable};
use crate::format::Format;
use crate::frame::FrameAllocator;
use core::fmt;

/// Displays a table as lines `GPA start-end -> HPA start  size x count  rights`, merging
/// neighbouring leaves of the same size and rights that are contiguous in host memory.
pub struct TableDump<'t, F: Format, A: FrameAllocator> {
    table: &'t PageTable<F, A>,
}

impl<'t, F: Format, A: FrameAllocator> TableDump<'t, F, A> {
    pub(crate) fn new(table: &'t PageTable<F, A>) -> Self {
        Self { table }
    }
}

struct Run {
    first: Leaf,
    count: u64,
}

impl Run {
    fn extends(&self, l: &Leaf) -> bool {
        let n = self.count * self.first.size.bytes();
        l.size == self.first.size
            && l.flags == self.first.flags
            && l.gpa.as_u64() == self.first.gpa.as_u64() + n
            && l.hpa.as_u64() == self.first.hpa.as_u64() + n
    }

    fn write(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.count * self.first.size.bytes();
        writeln!(
            f,
            "  GPA {:#014x}-{:#014x} -> HPA {:#014x}  {:>4} x {:<6} {}",
            self.first.gpa.as_u64(),
            self.first.gpa.as_u64() + len,
            self.first.hpa.as_u64(),
            self.first.size,
            self.count,
            self.first.flags
        )
    }
}

impl<F: Format, A: FrameAllocator> fmt::Display for TableDump<'_, F, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} table, root {:?}, {} table frame(s)", F::NAME, self.table.root(), self.table.table_frames())?;
        let mut run: Option<Run> = None;
        let mut result = Ok(());
        self.table.for_each_leaf(crate::GuestPhysAddr::ZERO, u64::MAX, |l| match &mut run {
            Some(r) if r.extends(l) => r.count += 1,
            _ => {
                if let Some(r) = run.take() {
                    result = result.and_then(|_| r.write(f));
                }
                run = Some(Run { first: *l, count: 1 });
            }
        });
        result?;
        match run {
            Some(r) => r.write(f),
            None => writeln!(f, "  (nothing mapped)"),
        }
    }
}
