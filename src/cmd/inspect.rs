//! `expo inspect`: list a checkpoint's tensors and totals per dtype, from the headers only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::{json, Value};

use crate::checkpoint::{Checkpoint, Layout};
use crate::cli::InspectArgs;
use crate::dtype::Dtype;
use crate::hub;
use crate::hub::{CacheEnv, ResolvedInput};
use crate::report;

/// Tensor count, elements and bytes of one dtype (or of everything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, elements: u64, bytes: u64) {
        self.tensors += 1;
        self.elements += elements;
        self.bytes += bytes;
    }

    fn json(&self) -> Value {
        json!({"tensors": self.tensors, "elements": self.elements, "bytes": self.bytes})
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

/// Runs `expo inspect`.
pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let (ck, resolved) = hub::open_for("checkpoint", &args.path, &CacheEnv::from_process())?;
    if args.json {
        report::print_json(&to_json(&ck, &resolved))?;
    } else {
        report::print_text(&human(&ck, &resolved))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn index_name(ck: &Checkpoint) -> Option<&str> {
    match &ck.layout {
        Layout::Indexed { index_name, .. } => Some(index_name),
        Layout::Single => None,
    }
}

/// Where a Hub id was found in the cache, as JSON (null for local paths).
fn hub_json(resolved: &ResolvedInput) -> Value {
    match &resolved.hub {
        Some(h) => json!({
            "repo_id": h.repo_id,
            "revision": h.revision,
            "commit": h.commit,
            "path": resolved.path,
        }),
        None => Value::Null,
    }
}

fn to_json(ck: &Checkpoint, resolved: &ResolvedInput) -> Value {
    let (per, all) = totals(ck);
    let files: Vec<Value> = ck
        .shards
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "tensors": s.header.tensors.len(),
                "bytes": s.header.data_len,
                "file_bytes": s.header.data_start + s.header.data_len,
                "metadata": s.header.metadata,
            })
        })
        .collect();
    let tensors: Vec<Value> = ck
        .tensors()
        .map(|(loc, t)| {
            json!({
                "name": t.name,
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "elements": t.elements(),
                "file": ck.shards[loc.shard].name,
                "bytes": t.len(),
                "data_offsets": [t.start, t.end],
            })
        })
        .collect();
    let dtypes: serde_json::Map<String, Value> = per
        .iter()
        .map(|(d, t)| (d.name().to_string(), t.json()))
        .collect();
    json!({
        "path": ck.given,
        "hub": hub_json(resolved),
        "index": index_name(ck),
        "files": files,
        "tensors": tensors,
        "dtypes": dtypes,
        "total": all.json(),
    })
}

/// An integer with thousands separators.
pub(crate) fn grouped(n: u64) -> String {
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

fn human(ck: &Checkpoint, resolved: &ResolvedInput) -> String {
    let (per, all) = totals(ck);
    let mut s = String::new();
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
    if !rows.is_empty() {
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

    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<7}  {:>7}  {:>18}  {:>12}",
        "dtype", "tensors", "elements", "bytes"
    );
    for (name, t) in per
        .iter()
        .map(|(d, t)| (d.name(), t))
        .chain([("total", &all)])
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
    s
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
