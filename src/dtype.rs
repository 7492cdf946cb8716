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
    /// AMD's FP8 variants (written by torch on ROCm): no infinities, one NaN, no −0.
    F8E4M3FNUZ,
    F8E5M2FNUZ,
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
    /// Anything else (FP8 in all its variants, FP6, FP4, complex): no exact f64 arithmetic
    /// is defined for them here, so they are refused unless the tensor's α is 0, and then
    /// copied from θ1 byte for byte (`inspect` and `diff` compare their bytes).
    Opaque,
}

impl Dtype {
    /// All dtypes, for tests and messages.
    pub const ALL: [Dtype; 22] = [
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
        Dtype::F8E4M3FNUZ,
        Dtype::F8E5M2FNUZ,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
        Dtype::F4,
        Dtype::C64,
    ];

    /// Parses the header spelling (`"BF16"`, `"F8_E4M3"`, …).
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The dtype the `safetensors` crate parsed from a header; `None` for one this version of
    /// expo does not know (the crate's enum is non-exhaustive; the test
    /// `every_dtype_of_the_safetensors_crate_is_known` keeps the two in step).
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Dtype> {
        Dtype::from_name(&d.to_string())
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
            Dtype::F8E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8E5M2FNUZ => "F8_E5M2FNUZ",
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
            Dtype::F8E4M3
            | Dtype::F8E5M2
            | Dtype::F8E8M0
            | Dtype::F8E4M3FNUZ
            | Dtype::F8E5M2FNUZ => 8,
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
            | Dtype::F8E4M3FNUZ
            | Dtype::F8E5M2FNUZ
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

    /// The names the `safetensors` crate accepts, read from its own "expected one of" list
    /// (its `Dtype` is non-exhaustive, so it cannot be enumerated directly).
    fn crate_dtype_names() -> Vec<String> {
        let err = serde_json::from_str::<safetensors::Dtype>("\"NOT_A_DTYPE\"")
            .unwrap_err()
            .to_string();
        let list = err
            .split("expected one of")
            .nth(1)
            .expect("serde lists variants");
        list.split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .map(|s| s.split('`').next().unwrap_or("").to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    #[test]
    fn every_dtype_of_the_safetensors_crate_is_known() {
        let names = crate_dtype_names();
        assert!(names.len() >= 22, "{names:?}");
        for name in &names {
            let theirs: safetensors::Dtype = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            let ours = Dtype::from_safetensors(theirs)
                .unwrap_or_else(|| panic!("expo does not know the dtype {name}"));
            assert_eq!(ours.name(), name);
            assert_eq!(ours.bits(), theirs.bitsize() as u64, "{name}");
        }
        assert_eq!(names.len(), Dtype::ALL.len(), "{names:?}");
    }

    #[test]
    fn the_rocm_fp8_types_are_treated_like_the_other_fp8_types() {
        for d in [Dtype::F8E4M3FNUZ, Dtype::F8E5M2FNUZ] {
            assert_eq!(d.class(), Dtype::F8E4M3.class());
            assert_eq!(d.bits(), 8);
        }
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
