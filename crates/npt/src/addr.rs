//! Address newtypes: guest-physical, guest-virtual and host-physical never mix.

use core::fmt;
use core::ops::{Add, Sub};

/// An address that is out of range for its address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrOutOfRange {
    /// The rejected value.
    pub value: u64,
    /// How many bits the address space has.
    pub bits: u32,
}

impl fmt::Display for AddrOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address {:#x} does not fit in {} bits", self.value, self.bits)
    }
}
impl core::error::Error for AddrOutOfRange {}

macro_rules! address {
    ($(#[$doc:meta])* $name:ident, $short:literal, $bits:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Number of significant bits an address of this kind may have.
            pub const BITS: u32 = $bits;
            /// The zero address.
            pub const ZERO: Self = Self(0);

            /// Makes an address; panics if it has bits above [`Self::BITS`].
            #[track_caller]
            pub const fn new(value: u64) -> Self {
                match Self::try_new(value) {
                    Ok(a) => a,
                    Err(_) => panic!(concat!(stringify!($name), "::new: address out of range")),
                }
            }

            /// Makes an address, or says why it is out of range.
            pub const fn try_new(value: u64) -> Result<Self, AddrOutOfRange> {
                if Self::BITS < 64 && value >> Self::BITS != 0 {
                    Err(AddrOutOfRange { value, bits: Self::BITS })
                } else {
                    Ok(Self(value))
                }
            }

            /// Makes an address, dropping the bits above [`Self::BITS`].
            pub const fn new_truncate(value: u64) -> Self {
                if Self::BITS < 64 { Self(value & ((1u64 << Self::BITS) - 1)) } else { Self(value) }
            }

            /// Makes an address without checking its range.
            ///
            /// # Safety
            /// `value` must fit in [`Self::BITS`] bits; code that trusts the range (table
            /// indexing, entry encoding) may misbehave otherwise.
            pub const unsafe fn new_unchecked(value: u64) -> Self {
                Self(value)
            }

            /// The raw value.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }

            /// Rounds down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Rounds up to a multiple of `align` (a power of two), or `None` past the range.
            pub const fn align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => match Self::try_new(v & !(align - 1)) {
                        Ok(a) => Some(a),
                        Err(_) => None,
                    },
                    None => None,
                }
            }

            /// The offset within an `align`-sized block.
            pub const fn offset_in(self, align: u64) -> u64 {
                self.0 & (align - 1)
            }

            /// `self + n`, or `None` if that leaves the address space.
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => match Self::try_new(v) {
                        Ok(a) => Some(a),
                        Err(_) => None,
                    },
                    None => None,
                }
            }

            /// `self - n`, or `None` below zero.
            pub const fn checked_sub(self, n: u64) -> Option<Self> {
                match self.0.checked_sub(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            #[track_caller]
            fn add(self, n: u64) -> Self {
                self.checked_add(n).expect(concat!(stringify!($name), " + u64 overflowed"))
            }
        }

        impl Sub<u64> for $name {
            type Output = Self;
            #[track_caller]
            fn sub(self, n: u64) -> Self {
                self.checked_sub(n).expect(concat!(stringify!($name), " - u64 underflowed"))
            }
        }

        impl Sub<$name> for $name {
            type Output = u64;
            #[track_caller]
            fn sub(self, other: $name) -> u64 {
                self.0.checked_sub(other.0).expect(concat!(stringify!($name), " - ", stringify!($name), " underflowed"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, " {:#x}"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address!(
    /// A guest-physical address (GPA): what the guest believes is physical memory, translated by
    /// the nested table. 59 bits covers the widest format (Sv57x4: 57 + 2 bits).
    GuestPhysAddr, "GPA", 59
);
address!(
    /// A guest-virtual address (GVA): translated by the guest's own page tables. Any 64-bit value;
    /// canonical-form rules belong to the walker of the guest's paging mode.
    GuestVirtAddr, "GVA", 64
);
address!(
    /// A host-physical address (HPA): where memory really is. 56 bits covers RISC-V (44-bit PPN)
    /// and Intel's architectural MAXPHYADDR limit of 52.
    HostPhysAddr, "HPA", 56
);

/// A half-open range of guest-physical addresses, `start..end`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpaRange {
    /// First address in the range.
    pub start: GuestPhysAddr,
    /// First address past the range.
    pub end: GuestPhysAddr,
}

impl GpaRange {
    /// `start..start+len`, or `None` if that overflows the address space.
    pub fn from_start_len(start: GuestPhysAddr, len: u64) -> Option<Self> {
        Some(Self { start, end: start.checked_add(len)? })
    }
    /// Number of bytes.
    pub fn len(&self) -> u64 {
        self.end.as_u64().saturating_sub(self.start.as_u64())
    }
    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether `a` is inside.
    pub fn contains(&self, a: GuestPhysAddr) -> bool {
        self.start <= a && a < self.end
    }
    /// Whether the two ranges share a byte.
    pub fn overlaps(&self, o: &GpaRange) -> bool {
        self.start < o.end && o.start < self.end
    }
}

impl fmt::Debug for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GPA[{:#x}..{:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Display for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The page (leaf) sizes a nested table can map. Which of them a table may use depends on its
/// format and on the CPU (see [`crate::Format::LEAF_LEVELS`] and the table's options).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, a level-0 leaf.
    Size4K,
    /// 2 MiB, a level-1 leaf.
    Size2M,
    /// 1 GiB, a level-2 leaf.
    Size1G,
    /// 512 GiB, a level-3 leaf (Sv48x4 and Sv57x4 only).
    Size512G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 4] = [Self::Size4K, Self::Size2M, Self::Size1G, Self::Size512G];

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        1u64 << (12 + 9 * self.level() as u32)
    }

    /// Level of a leaf of this size (0 = 4 KiB).
    pub const fn level(self) -> usize {
        match self {
            Self::Size4K => 0,
            Self::Size2M => 1,
            Self::Size1G => 2,
            Self::Size512G => 3,
        }
    }

    /// The size of a leaf at `level`, if there is one.
    pub const fn from_level(level: usize) -> Option<Self> {
        match level {
            0 => Some(Self::Size4K),
            1 => Some(Self::Size2M),
            2 => Some(Self::Size1G),
            3 => Some(Self::Size512G),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Size4K => "4K",
            Self::Size2M => "2M",
            Self::Size1G => "1G",
            Self::Size512G => "512G",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn ranges_are_checked() {
        assert!(GuestPhysAddr::try_new(1 << 59).is_err());
        assert_eq!(GuestPhysAddr::try_new((1 << 59) - 1).unwrap().as_u64(), (1 << 59) - 1);
        assert_eq!(HostPhysAddr::new_truncate(u64::MAX).as_u64(), (1 << 56) - 1);
        assert!(GuestVirtAddr::try_new(u64::MAX).is_ok());
        assert_eq!(GuestPhysAddr::new((1 << 59) - 1).checked_add(1), None);
        assert_eq!(GuestPhysAddr::new(0x1001).align_up(0x1000), Some(GuestPhysAddr::new(0x2000)));
        assert_eq!(GuestPhysAddr::new((1 << 59) - 1).align_up(0x1000), None);
        assert_eq!(format!("{:?}", HostPhysAddr::new(0x1000)), "HPA(0x1000)");
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::Size4K.bytes(), 4096);
        assert_eq!(PageSize::Size2M.bytes(), 2 << 20);
        assert_eq!(PageSize::Size1G.bytes(), 1 << 30);
        assert_eq!(PageSize::Size512G.bytes(), 512 << 30);
        for s in PageSize::ALL {
            assert_eq!(PageSize::from_level(s.level()), Some(s));
        }
    }
}
