//! Safetensors element types and how expo treats each of them.

use std::fmt;

/// An element type as named in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F6E2M3,
    F6E3M2,
    F4,
    C64,
}

/// The float element types expo extrapolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FloatDtype {
    BF16,
    F16,
    F32,
    F64,
}

/// How a tensor of a given dtype is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeClass {
    /// f16, bf16, f32, f64: extrapolated in f64.
    Float(FloatDtype),
    /// Integers and bool: must be byte-identical on both sides; copied.
    Exact,
    /// Anything else (FP8, FP6, FP4, complex): refused unless the tensor's α is 0.
    Opaque,
}

impl Dtype {
    /// All dtypes, for tests and messages.
    pub const ALL: [Dtype; 20] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::U16,
        Dtype::I16,
        Dtype::U32,
        Dtype::I32,
        Dtype::U64,
        Dtype::I64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::F8E8M0,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
        Dtype::F4,
        Dtype::C64,
    ];

    /// Parses the header spelling (`"BF16"`, `"F8_E4M3"`, …).
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The header spelling.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::F4 => "F4",
            Dtype::C64 => "C64",
        }
    }

    /// Size of one element in bits (sub-byte types are packed).
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 8,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E8M0 => 8,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 32,
            Dtype::U64 | Dtype::I64 | Dtype::F64 | Dtype::C64 => 64,
        }
    }

    /// How expo treats tensors of this dtype.
    pub fn class(self) -> DtypeClass {
        match self {
            Dtype::BF16 => DtypeClass::Float(FloatDtype::BF16),
            Dtype::F16 => DtypeClass::Float(FloatDtype::F16),
            Dtype::F32 => DtypeClass::Float(FloatDtype::F32),
            Dtype::F64 => DtypeClass::Float(FloatDtype::F64),
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::U16
            | Dtype::I16
            | Dtype::U32
            | Dtype::I32
            | Dtype::U64
            | Dtype::I64 => DtypeClass::Exact,
            Dtype::F8E4M3
            | Dtype::F8E5M2
            | Dtype::F8E8M0
            | Dtype::F6E2M3
            | Dtype::F6E3M2
            | Dtype::F4
            | Dtype::C64 => DtypeClass::Opaque,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FloatDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::BF16 | FloatDtype::F16 => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }

    /// The general dtype this float type is.
    pub fn dtype(self) -> Dtype {
        match self {
            FloatDtype::BF16 => Dtype::BF16,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F64 => Dtype::F64,
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.dtype().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
        }
        assert_eq!(
            Dtype::from_name("bf16"),
            None,
            "header names are case-sensitive"
        );
        assert_eq!(Dtype::from_name("F8"), None);
    }

    #[test]
    fn float_sizes_match_bits() {
        for f in [
            FloatDtype::BF16,
            FloatDtype::F16,
            FloatDtype::F32,
            FloatDtype::F64,
        ] {
            assert_eq!(f.size() as u64 * 8, f.dtype().bits());
            assert_eq!(f.dtype().class(), DtypeClass::Float(f));
        }
    }
}
