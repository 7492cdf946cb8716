//! Parsing and validating one safetensors header.
//!
//! **What is a valid header is decided by the `safetensors` crate**, the code behind every
//! loader expo's users run (Python's `safe_open` and `load_file`, transformers, vLLM,
//! candle): the header text is deserialized into the crate's own
//! [`safetensors::tensor::Metadata`], which is exactly the parse and validation that
//! `SafeTensors::read_metadata` runs (dtype names, shapes, offsets in order and tiling, size
//! arithmetic). `read_metadata` wants the whole file in memory; expo reads only the 8-byte
//! prefix and the header, so it applies read_metadata's checks on those itself: the same
//! 100 MB cap on the header length, the header inside the file, and the tensors ending
//! exactly at the end of the file. On top of that come expo's stricter rules, listed in
//! [`STRICTER_RULES`] and applied in [`check_stricter_rules`]: these are the only headers the
//! crate accepts and expo refuses (the test `tests/header_crate.rs` checks this on generated
//! and mutated headers).
//!
//! When the crate refuses a header, its error often names no tensor; [`explain`] then finds
//! the tensor and the reason, so that the message says what to fix. It only words the
//! error: whether a header is accepted never depends on it.
//!
//! Headers are untrusted: the length prefix is capped before anything is allocated, and the
//! memory used is a small multiple of the header's size.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::dtype::Dtype;

/// Largest header accepted, in bytes (the `safetensors` crate's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The header key that holds free-form string metadata.
pub const METADATA_KEY: &str = "__metadata__";

/// The rules by which expo is stricter than the `safetensors` crate, each with the reason.
/// Every other header is accepted exactly when the crate accepts it.
pub const STRICTER_RULES: [(&str, &str); 2] = [
    (
        "a tensor name appears only once in a header",
        "the crate keeps the last entry and silently drops the others, so the file means \
         different things to different readers",
    ),
    (
        "the file is a regular file (not a FIFO, device or directory)",
        "a hostile checkpoint must not make expo block or read forever; checked before any read",
    ),
];

/// One tensor's entry in a header, with offsets relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte offset of the first element, relative to the data section.
    pub start: u64,
    /// Byte offset one past the last element, relative to the data section.
    pub end: u64,
}

impl TensorInfo {
    /// Size of the tensor's data in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Number of elements (checked when the header was parsed).
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The `__metadata__` map, if the header had one (`null` counts as none, as in the
    /// crate: MLX writes it whenever there is no metadata).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors in data order (ascending offsets; zero-sized tensors at one offset by name).
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
    /// Size of the data section in bytes.
    pub data_len: u64,
}

/// Everything that can be wrong with a safetensors header. Messages are complete on their
/// own: no variant also returns its cause from `source()`, so a cause is printed once.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("file is {file_len} bytes, too short for a safetensors header (needs at least 8; truncated download?)")]
    TooShort { file_len: u64 },
    #[error("header length {header_len} exceeds the limit of {limit} bytes (corrupt file?)")]
    TooLarge { header_len: u64, limit: u64 },
    #[error("header length {header_len} runs past the end of the {file_len}-byte file (truncated download?)")]
    PastEnd { header_len: u64, file_len: u64 },
    #[error("header is not valid UTF-8: {error}")]
    Utf8 { error: std::str::Utf8Error },
    #[error("header is not valid JSON: {error}")]
    Json { error: serde_json::Error },
    #[error("tensor `{tensor}` appears twice in the header (the safetensors library would silently keep the last one; re-save the checkpoint)")]
    DuplicateTensor { tensor: String },
    #[error("`__metadata__` must map strings to strings, found {found}")]
    InvalidMetadata { found: String },
    #[error("tensor `{tensor}`: invalid entry: {reason}")]
    InvalidEntry { tensor: String, reason: String },
    #[error(
        "tensor `{tensor}`: unknown dtype `{dtype}` (the safetensors format defines {})",
        known_dtypes()
    )]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor `{tensor}`: shape {shape:?} has too many elements")]
    ShapeOverflow { tensor: String, shape: Vec<u64> },
    #[error("tensor `{tensor}`: shape {shape:?} of {dtype} is not a whole number of bytes")]
    PartialByte {
        tensor: String,
        shape: Vec<u64>,
        dtype: Dtype,
    },
    #[error("tensor `{tensor}`: shape {shape:?} of {dtype} needs {expected} bytes but its offsets [{start}, {end}] span {actual}")]
    LengthMismatch {
        tensor: String,
        shape: Vec<u64>,
        dtype: Dtype,
        start: u64,
        end: u64,
        expected: u64,
        actual: i128,
    },
    #[error("tensor `{tensor}` starts at data offset {start} but {expected_desc}")]
    Layout {
        tensor: String,
        start: u64,
        expected_desc: String,
    },
    #[error("the tensors cover {covered} bytes but the data section holds {data_len} (truncated or padded file?)")]
    DataLength { covered: u64, data_len: u64 },
    /// The `safetensors` crate refused the header for a reason [`explain`] cannot word
    /// better (e.g. JSON nested deeper than its parser allows).
    #[error("the safetensors library refuses the header: {reason}")]
    Refused { reason: String },
    /// The file could not be read; the cause is the `source`, not part of the message.
    #[error("reading the header")]
    Io {
        #[source]
        source: std::io::Error,
    },
    #[error("not a regular file")]
    NotAFile,
}

impl HeaderError {
    /// True for the errors of expo's [`STRICTER_RULES`], the only ones raised for a header
    /// that the `safetensors` crate accepts.
    pub fn is_stricter_rule(&self) -> bool {
        matches!(
            self,
            HeaderError::DuplicateTensor { .. } | HeaderError::NotAFile
        )
    }
}

fn known_dtypes() -> String {
    Dtype::ALL.map(|d| d.name()).join(", ")
}

/// Reads and validates the header of the safetensors file at `path`.
///
/// Only the header is read; tensor data is not touched.
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    let mut file = open_regular(path)
        .map_err(|source| HeaderError::Io { source })?
        .ok_or(HeaderError::NotAFile)?;
    let file_len = file
        .metadata()
        .map_err(|source| HeaderError::Io { source })?
        .len();
    if file_len < 8 {
        return Err(HeaderError::TooShort { file_len });
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|source| HeaderError::Io { source })?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge {
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    if header_len > file_len - 8 {
        return Err(HeaderError::PastEnd {
            header_len,
            file_len,
        });
    }
    // Bounded by MAX_HEADER_LEN and by the file's real size.
    let mut bytes = vec![0u8; header_len as usize];
    file.read_exact(&mut bytes)
        .map_err(|source| HeaderError::Io { source })?;
    parse_header(&bytes, file_len)
}

/// Opens `path` for reading if it is a regular file (following symlinks), `Ok(None)` if it
/// is something else. A FIFO or device named by a hostile checkpoint must not make expo
/// block or read forever, so the file is opened non-blocking and checked before any read.
pub fn open_regular(path: &Path) -> std::io::Result<Option<File>> {
    let file = crate::sys::open_nonblocking(path)?;
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    Ok(Some(file))
}

/// Validates header bytes (without the 8-byte length prefix) for a file of `file_len` bytes:
/// the `safetensors` crate's validation, then expo's [`STRICTER_RULES`].
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let data_start = 8 + bytes.len() as u64;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or(HeaderError::PastEnd {
            header_len: bytes.len() as u64,
            file_len,
        })?;
    let text = std::str::from_utf8(bytes).map_err(|error| HeaderError::Utf8 { error })?;

    // 1. The crate's own parse and validation, as in `SafeTensors::read_metadata`.
    let meta: safetensors::tensor::Metadata = match serde_json::from_str(text) {
        Ok(meta) => meta,
        Err(e) => {
            return Err(explain(text, data_len).unwrap_or(HeaderError::Refused {
                reason: e.to_string(),
            }))
        }
    };
    // read_metadata's last check: the tensors end exactly where the file does.
    let covered = meta.data_len() as u64;
    if covered != data_len {
        return Err(
            explain(text, data_len).unwrap_or(HeaderError::DataLength { covered, data_len })
        );
    }

    // 2. The crate's result in expo's types.
    let mut tensors = Vec::new();
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else {
            continue;
        };
        let Some(dtype) = Dtype::from_safetensors(info.dtype) else {
            return Err(HeaderError::UnknownDtype {
                tensor: name,
                dtype: info.dtype.to_string(),
            });
        };
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            start: info.data_offsets.0 as u64,
            end: info.data_offsets.1 as u64,
        });
    }
    // Zero-sized tensors at one offset come in hash order from the crate: sort them by name,
    // so that the same file always gives the same order.
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    drop(meta);

    // 3. expo's stricter rules.
    check_stricter_rules(text, tensors.len())?;
    Ok(Header {
        metadata,
        tensors,
        data_start,
        data_len,
    })
}

/// Applies the header rules of [`STRICTER_RULES`] to a header the crate accepted with
/// `tensors` distinct tensor names. (The regular-file rule is applied by [`read_header`]
/// before anything is read.)
fn check_stricter_rules(text: &str, tensors: usize) -> Result<(), HeaderError> {
    // A tensor name given twice: the crate keeps one entry per name, so more keys than
    // tensors means a repeated name. Counting allocates nothing; naming it is for errors.
    let keys: KeyCount = serde_json::from_str(text).map_err(|error| HeaderError::Json { error })?;
    if keys.tensors > tensors {
        return Err(
            find_duplicate(text)?.unwrap_or(HeaderError::DuplicateTensor {
                tensor: String::new(),
            }),
        );
    }
    Ok(())
}

/// The first key of the header given twice, as an error.
fn find_duplicate(text: &str) -> Result<Option<HeaderError>, HeaderError> {
    let raw: Entries<IgnoredAny> =
        serde_json::from_str(text).map_err(|error| HeaderError::Json { error })?;
    let mut seen = HashSet::with_capacity(raw.0.len());
    for (name, _) in raw.0 {
        if !seen.insert(name.clone()) {
            return Ok(Some(HeaderError::DuplicateTensor { tensor: name }));
        }
    }
    Ok(None)
}

/// Says what is wrong with a header the crate refused, naming the tensor: the first problem
/// found, checking in the order a reader would (names, metadata, each entry, then the
/// tiling of the data section of `data_len` bytes). `None` when it finds nothing, and then
/// the crate's own message is used.
pub fn explain(text: &str, data_len: u64) -> Option<HeaderError> {
    let raw: Entries<&RawValue> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(error) => return Some(HeaderError::Json { error }),
    };
    let mut seen = HashSet::with_capacity(raw.0.len());
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if !seen.insert(name.clone()) {
            return Some(HeaderError::DuplicateTensor { tensor: name });
        }
        let checked = if name == METADATA_KEY {
            check_metadata(value)
        } else {
            parse_entry(name, value).map(|t| tensors.push(t))
        };
        if let Err(e) = checked {
            return Some(e);
        }
    }
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    let mut cursor = 0u64;
    for t in &tensors {
        if t.start != cursor {
            let expected_desc = if t.start < cursor {
                format!("overlaps the previous tensor, which ends at {cursor}")
            } else {
                format!(
                    "the previous tensor ends at {cursor} (gap of {} bytes)",
                    t.start - cursor
                )
            };
            return Some(HeaderError::Layout {
                tensor: t.name.clone(),
                start: t.start,
                expected_desc,
            });
        }
        cursor = t.end;
    }
    (cursor != data_len).then_some(HeaderError::DataLength {
        covered: cursor,
        data_len,
    })
}

fn check_metadata(value: &RawValue) -> Result<(), HeaderError> {
    let value: serde_json::Value =
        serde_json::from_str(value.get()).map_err(|error| HeaderError::Json { error })?;
    let map = match value {
        serde_json::Value::Null => return Ok(()),
        serde_json::Value::Object(map) => map,
        other => {
            return Err(HeaderError::InvalidMetadata {
                found: json_kind(&other).to_string(),
            })
        }
    };
    for (k, v) in map {
        if !v.is_string() {
            return Err(HeaderError::InvalidMetadata {
                found: format!("{} for key `{k}`", json_kind(&v)),
            });
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn parse_entry(name: String, value: &RawValue) -> Result<TensorInfo, HeaderError> {
    let entry: RawEntry = match serde_json::from_str(value.get()) {
        Ok(e) => e,
        Err(e) => {
            return Err(HeaderError::InvalidEntry {
                tensor: name,
                reason: e.to_string(),
            })
        }
    };
    let Some(dtype) = Dtype::from_name(&entry.dtype) else {
        return Err(HeaderError::UnknownDtype {
            tensor: name,
            dtype: entry.dtype,
        });
    };
    let (start, end) = entry.data_offsets;
    let shape = entry.shape;
    let expected = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bits()));
    let Some(bits) = expected else {
        return Err(HeaderError::ShapeOverflow {
            tensor: name,
            shape,
        });
    };
    if bits % 8 != 0 {
        return Err(HeaderError::PartialByte {
            tensor: name,
            shape,
            dtype,
        });
    }
    let expected = bits / 8;
    if end < start || end - start != expected {
        return Err(HeaderError::LengthMismatch {
            tensor: name,
            shape,
            dtype,
            start,
            end,
            expected,
            actual: end as i128 - start as i128,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The number of top-level keys of a header other than `__metadata__`, counted without
/// allocating.
struct KeyCount {
    tensors: usize,
}

impl<'de> Deserialize<'de> for KeyCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IsMetadataKey(bool);
        impl<'de> Deserialize<'de> for IsMetadataKey {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = IsMetadataKey;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E>(self, v: &str) -> Result<IsMetadataKey, E> {
                        Ok(IsMetadataKey(v == METADATA_KEY))
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = KeyCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyCount, A::Error> {
                let mut tensors = 0;
                while let Some((key, IgnoredAny)) = map.next_entry::<IsMetadataKey, IgnoredAny>()? {
                    tensors += usize::from(!key.0);
                }
                Ok(KeyCount { tensors })
            }
        }
        deserializer.deserialize_map(CountVisitor)
    }
}

/// A JSON object read as a list of entries in document order, so that a key given twice
/// is seen (serde_json's maps silently keep the last one).
#[derive(Debug)]
pub(crate) struct Entries<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                // Capacity hints come from untrusted input: cap them.
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = map.next_entry::<String, V>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor(std::marker::PhantomData))
    }
}

/// Serializes a header for tensors laid out contiguously in the given order.
///
/// The JSON is compact, `__metadata__` first, then tensors in data order, padded with
/// spaces to a multiple of 8 bytes so the data section is aligned. The same inputs always
/// give the same bytes.
pub fn encode_header(
    metadata: Option<&BTreeMap<String, String>>,
    tensors: &[(&str, Dtype, &[u64], u64, u64)],
) -> Vec<u8> {
    use std::fmt::Write;
    let mut s = String::with_capacity(64 + tensors.len() * 96);
    s.push('{');
    let mut first = true;
    if let Some(meta) = metadata {
        s.push_str("\"__metadata__\":");
        s.push_str(&serde_json::to_string(meta).expect("string maps always serialize"));
        first = false;
    }
    for (name, dtype, shape, start, end) in tensors {
        if !first {
            s.push(',');
        }
        first = false;
        s.push_str(&serde_json::to_string(name).expect("strings always serialize"));
        let _ = write!(s, ":{{\"dtype\":\"{}\",\"shape\":[", dtype.name());
        for (i, d) in shape.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{d}");
        }
        let _ = write!(s, "],\"data_offsets\":[{start},{end}]}}");
    }
    s.push('}');
    while !s.len().is_multiple_of(8) {
        s.push(' ');
    }
    let mut out = Vec::with_capacity(8 + s.len());
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data_len: usize) -> (Vec<u8>, u64) {
        let bytes = header.as_bytes().to_vec();
        let file_len = 8 + bytes.len() as u64 + data_len as u64;
        (bytes, file_len)
    }

    #[test]
    fn parses_a_valid_header_in_data_order() {
        let (h, len) = file_with(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}"#,
            10,
        );
        let header = parse_header(&h, len).unwrap();
        assert_eq!(header.tensors.len(), 2);
        assert_eq!(header.tensors[0].name, "a");
        assert_eq!(header.tensors[1].name, "b");
        assert_eq!(header.metadata.unwrap()["format"], "pt");
        assert_eq!(header.data_len, 10);
    }

    #[test]
    fn rejects_duplicate_names() {
        let (h, len) = file_with(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        );
        assert!(matches!(
            parse_header(&h, len),
            Err(HeaderError::DuplicateTensor { tensor }) if tensor == "a"
        ));
    }

    #[test]
    fn rejects_gaps_overlaps_and_trailing_bytes() {
        let gap = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
        let (h, len) = file_with(gap, 3);
        assert!(matches!(
            parse_header(&h, len),
            Err(HeaderError::Layout { .. })
        ));
        let overlap = r#"{"a":{"dtype":"U16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let (h, len) = file_with(overlap, 2);
        assert!(matches!(
            parse_header(&h, len),
            Err(HeaderError::Layout { .. })
        ));
        let (h, len) = file_with(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            5,
        );
        assert!(matches!(
            parse_header(&h, len),
            Err(HeaderError::DataLength {
                covered: 1,
                data_len: 5
            })
        ));
    }

    #[test]
    fn rejects_bad_entries() {
        let cases = [
            (
                r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}}"#,
                "needs 12 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
                "too many elements",
            ),
            (
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#,
                "whole number of bytes",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#,
                "span -1",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                "invalid entry",
            ),
            (
                r#"{"__metadata__":{"format":1}}"#,
                "must map strings to strings",
            ),
            (r#"[1,2]"#, "not valid JSON"),
            (r#"{"a":"#, "not valid JSON"),
        ];
        for (header, expect) in cases {
            let (h, len) = file_with(header, 4);
            let err = parse_header(&h, len).unwrap_err().to_string();
            assert!(err.contains(expect), "{header}: {err}");
        }
    }

    #[test]
    fn null_metadata_is_no_metadata() {
        let (h, len) = file_with(
            r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        let header = parse_header(&h, len).unwrap();
        assert_eq!(header.metadata, None);
        assert_eq!(header.tensors.len(), 1);
    }

    #[test]
    fn every_fp8_variant_parses() {
        for d in [
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
            "F8_E8M0",
            "F8_E4M3",
            "F8_E5M2",
        ] {
            let header = format!(r#"{{"a":{{"dtype":"{d}","shape":[2],"data_offsets":[0,2]}}}}"#);
            let (h, len) = file_with(&header, 2);
            let parsed = parse_header(&h, len).unwrap();
            assert_eq!(parsed.tensors[0].dtype.name(), d);
        }
    }

    #[test]
    fn the_crates_nameless_refusals_are_worded_with_the_tensor() {
        // The crate says "invalid shape, data type, or offset for tensor" without a name.
        let (h, len) = file_with(
            r#"{"z":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[3],"data_offsets":[1,5]}}"#,
            5,
        );
        let err = parse_header(&h, len).unwrap_err().to_string();
        assert!(
            err.contains("tensor `w`") && err.contains("needs 12 bytes"),
            "{err}"
        );
        // Nesting deeper than the crate's JSON parser allows has nothing better to say.
        let deep = format!(
            r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":{}1{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let (h, len) = file_with(&deep, 1);
        let err = parse_header(&h, len).unwrap_err();
        assert!(matches!(err, HeaderError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }

    #[test]
    fn zero_sized_tensors_at_one_offset_come_in_name_order() {
        let (h, len) = file_with(
            r#"{"c":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        let names: Vec<String> = parse_header(&h, len)
            .unwrap()
            .tensors
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["a", "c", "b"]);
    }

    #[test]
    fn encoded_headers_parse_back_and_are_aligned() {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = encode_header(
            Some(&meta),
            &[
                ("w\"q", Dtype::BF16, &[2, 3], 0, 12),
                ("b", Dtype::I64, &[1], 12, 20),
            ],
        );
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = parse_header(&bytes[8..], (bytes.len() + 20) as u64).unwrap();
        assert_eq!(header.tensors[0].name, "w\"q");
        assert_eq!(header.tensors[1].shape, vec![1]);
        assert_eq!(header.metadata, Some(meta));
    }
}
