//! Parsing and validating one safetensors header.
//!
//! Headers are untrusted: the length prefix is capped before anything is allocated, every
//! size is computed with checked arithmetic, and the data section must be exactly tiled by
//! the tensors (no gaps, no overlaps, nothing trailing), which is what the reference loader
//! requires too. Unlike the `safetensors` crate, a name that appears twice in one header is
//! an error instead of silently keeping the last entry.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::dtype::Dtype;

/// Largest header accepted, in bytes (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The header key that holds free-form string metadata.
pub const METADATA_KEY: &str = "__metadata__";

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
    /// The `__metadata__` map, if the header had one.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors in data order (ascending offsets).
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
    /// Size of the data section in bytes.
    pub data_len: u64,
}

/// Everything that can be wrong with a safetensors header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("file is {file_len} bytes, too short for a safetensors header (needs at least 8)")]
    TooShort { file_len: u64 },
    #[error("header length {header_len} exceeds the limit of {limit} bytes (corrupt file?)")]
    TooLarge { header_len: u64, limit: u64 },
    #[error("header length {header_len} runs past the end of the {file_len}-byte file (truncated download?)")]
    PastEnd { header_len: u64, file_len: u64 },
    #[error("header is not valid UTF-8: {source}")]
    Utf8 { source: std::str::Utf8Error },
    #[error("header is not valid JSON: {source}")]
    Json { source: serde_json::Error },
    #[error("header is not a JSON object of tensors")]
    NotAnObject,
    #[error("tensor `{tensor}` appears twice in the header")]
    DuplicateTensor { tensor: String },
    #[error("`__metadata__` must map strings to strings, found {found}")]
    InvalidMetadata { found: String },
    #[error("tensor `{tensor}`: invalid entry: {reason}")]
    InvalidEntry { tensor: String, reason: String },
    #[error("tensor `{tensor}`: unknown dtype `{dtype}`")]
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
    #[error("reading the header: {source}")]
    Io { source: std::io::Error },
    #[error("not a regular file")]
    NotAFile,
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
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    Ok(Some(file))
}

/// Validates header bytes (without the 8-byte length prefix) for a file of `file_len` bytes.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(bytes).map_err(|source| HeaderError::Utf8 { source })?;
    // Entries are kept as borrowed raw JSON and parsed one at a time, so memory stays a
    // small multiple of the header's size (a generic JSON tree costs over 20×).
    let raw: RawHeader<'_> =
        serde_json::from_str(text).map_err(|source| HeaderError::Json { source })?;
    let data_start = 8 + bytes.len() as u64;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or(HeaderError::PastEnd {
            header_len: bytes.len() as u64,
            file_len,
        })?;

    let mut seen = HashSet::with_capacity(raw.0.len());
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::DuplicateTensor { tensor: name });
        }
        if name == METADATA_KEY {
            let value =
                serde_json::from_str(value.get()).map_err(|source| HeaderError::Json { source })?;
            metadata = Some(parse_metadata(value)?);
        } else {
            tensors.push(parse_entry(name, value)?);
        }
    }

    // Zero-sized tensors sort before anything else at the same offset, so the tiling check
    // below accepts them wherever they sit.
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
            return Err(HeaderError::Layout {
                tensor: t.name.clone(),
                start: t.start,
                expected_desc,
            });
        }
        cursor = t.end;
    }
    if cursor != data_len {
        return Err(HeaderError::DataLength {
            covered: cursor,
            data_len,
        });
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
        data_len,
    })
}

fn parse_metadata(value: serde_json::Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let serde_json::Value::Object(map) = value else {
        return Err(HeaderError::InvalidMetadata {
            found: json_kind(&value).to_string(),
        });
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(HeaderError::InvalidMetadata {
                found: format!("{} for key `{k}`", json_kind(&other)),
            }),
        })
        .collect()
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

/// The top-level header object with its entries in file order, duplicates kept so that
/// they can be reported; values stay unparsed slices of the header text.
struct RawHeader<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawHeader<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Entries::deserialize(deserializer).map(|e| RawHeader(e.0))
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
