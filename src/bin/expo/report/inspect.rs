//! What `expo inspect` prints: the JSON document, streamed tensor by tensor, and the
//! human listing.
//!
//! JSON objects are written with their keys in alphabetical order (the order serde_json's
//! own maps have), so that the document reads the same whatever writes it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

use crate::report;
use expo::checkpoint::{Checkpoint, Layout};
use expo::dtype::Dtype;
use expo::hub::ResolvedInput;

/// Tensor count, elements and bytes of one dtype (or of everything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub bytes: u64,
    pub elements: u64,
    pub tensors: usize,
}

impl Totals {
    fn add(&mut self, elements: u64, bytes: u64) {
        self.tensors += 1;
        self.elements += elements;
        self.bytes += bytes;
    }
}

/// Totals per dtype and over the whole checkpoint.
pub fn totals(ck: &Checkpoint) -> (BTreeMap<Dtype, Totals>, Totals) {
    let mut per = BTreeMap::new();
    let mut all = Totals::default();
    for (_, t) in ck.tensors() {
        per.entry(t.dtype)
            .or_insert_with(Totals::default)
            .add(t.elements(), t.len());
        all.add(t.elements(), t.len());
    }
    (per, all)
}

/// An integer with thousands separators.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn index_name(ck: &Checkpoint) -> Option<&str> {
    match &ck.layout {
        Layout::Indexed { index_name, .. } => Some(index_name),
        Layout::Single => None,
    }
}

// ---------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------

/// Where a Hub id was found in the cache.
#[derive(Serialize)]
struct HubJson<'a> {
    commit: &'a str,
    #[serde(serialize_with = "expo::text::serialize_path")]
    path: &'a Path,
    repo_id: &'a str,
    revision: &'a str,
}

#[derive(Serialize)]
struct FileJson<'a> {
    bytes: u64,
    file_bytes: u64,
    metadata: Option<BTreeMap<&'a str, &'a str>>,
    name: &'a str,
    tensors: usize,
}

#[derive(Serialize)]
struct TensorJson<'a> {
    bytes: u64,
    data_offsets: [u64; 2],
    dtype: &'static str,
    elements: u64,
    file: &'a str,
    name: &'a str,
    shape: &'a [u64],
}

/// The checkpoint's tensors, serialized one at a time.
struct Tensors<'a>(&'a Checkpoint);

impl Serialize for Tensors<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ck = self.0;
        let mut seq = s.serialize_seq(Some(ck.len()))?;
        for (loc, t) in ck.tensors() {
            seq.serialize_element(&TensorJson {
                bytes: t.len(),
                data_offsets: [t.start, t.end],
                dtype: t.dtype.name(),
                elements: t.elements(),
                file: &ck.shards[loc.shard].name,
                name: &t.name,
                shape: &t.shape,
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct InspectJson<'a> {
    dtypes: BTreeMap<&'static str, Totals>,
    files: Vec<FileJson<'a>>,
    hub: Option<HubJson<'a>>,
    index: Option<&'a str>,
    #[serde(serialize_with = "expo::text::serialize_path")]
    path: &'a Path,
    tensors: Tensors<'a>,
    total: Totals,
}

/// Writes the `--json` document of `expo inspect` (pretty, then a newline) to `out`, one
/// tensor at a time: memory does not grow with the size of the document.
pub fn write_json(
    out: &mut impl io::Write,
    ck: &Checkpoint,
    resolved: &ResolvedInput,
) -> io::Result<()> {
    super::mark_json_printed();
    let (per, total) = totals(ck);
    let files = ck
        .shards
        .iter()
        .map(|s| FileJson {
            bytes: s.header.data_len,
            file_bytes: s.header.data_start + s.header.data_len,
            metadata: s
                .header
                .metadata
                .as_ref()
                .map(|m| m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()),
            name: &s.name,
            tensors: s.header.tensors.len(),
        })
        .collect();
    let doc = InspectJson {
        dtypes: per.iter().map(|(d, t)| (d.name(), *t)).collect(),
        files,
        hub: resolved.hub.as_ref().map(|h| HubJson {
            commit: &h.commit,
            path: &resolved.path,
            repo_id: &h.repo_id,
            revision: &h.revision,
        }),
        index: index_name(ck),
        path: &ck.given,
        tensors: Tensors(ck),
        total,
    };
    doc.serialize(&mut serde_json::Serializer::pretty(&mut *out))?;
    writeln!(out)
}

// ---------------------------------------------------------------------------------------
// Human output
// ---------------------------------------------------------------------------------------

/// The listing: where the checkpoint is, one row per tensor, and totals per dtype.
pub fn human(ck: &Checkpoint, resolved: &ResolvedInput) -> String {
    let mut s = String::new();
    let (per, all) = totals(ck);
    heading(&mut s, ck, resolved, &all);
    tensor_rows(&mut s, ck);
    dtype_rows(&mut s, &per, &all);
    s
}

fn heading(s: &mut String, ck: &Checkpoint, resolved: &ResolvedInput, all: &Totals) {
    if let Some(h) = &resolved.hub {
        let _ = writeln!(
            s,
            "{}@{} (commit {}) in the Hugging Face cache: {}",
            h.repo_id,
            h.revision,
            h.commit,
            resolved.path.display()
        );
    }
    let files = match index_name(ck) {
        Some(index) => format!(
            "{} file{} listed in {index}",
            ck.shards.len(),
            if ck.shards.len() == 1 { "" } else { "s" }
        ),
        None => format!("1 file ({})", ck.shards[0].name),
    };
    let _ = writeln!(
        s,
        "{}: {files}, {} tensors, {} elements, {}",
        ck.given.display(),
        all.tensors,
        grouped(all.elements),
        report::bytes(all.bytes)
    );
}

fn tensor_rows(s: &mut String, ck: &Checkpoint) {
    let rows: Vec<[String; 5]> = ck
        .tensors()
        .map(|(loc, t)| {
            [
                t.dtype.name().to_string(),
                format!("{:?}", t.shape),
                report::bytes(t.len()),
                ck.shards[loc.shard].name.clone(),
                t.name.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let header = ["dtype", "shape", "bytes", "file", "tensor"].map(String::from);
    let widths: Vec<usize> = (0..4)
        .map(|c| {
            rows.iter()
                .chain([&header])
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let _ = writeln!(s);
    for row in [&header].into_iter().chain(&rows) {
        let _ = writeln!(
            s,
            "  {:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
}

fn dtype_rows(s: &mut String, per: &BTreeMap<Dtype, Totals>, all: &Totals) {
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<7}  {:>7}  {:>18}  {:>12}",
        "dtype", "tensors", "elements", "bytes"
    );
    for (name, t) in per
        .iter()
        .map(|(d, t)| (d.name(), t))
        .chain([("total", all)])
    {
        let _ = writeln!(
            s,
            "  {:<7}  {:>7}  {:>18}  {:>12}  {:>16}",
            name,
            t.tensors,
            grouped(t.elements),
            report::bytes(t.bytes),
            format!("({} B)", grouped(t.bytes)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(70_553_706_496), "70,553,706,496");
    }
}
