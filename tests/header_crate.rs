//! Differential test: expo accepts a safetensors header if and only if the `safetensors`
//! crate (what the loaders run) accepts it, except for the rules listed in
//! `expo::header::STRICTER_RULES`, and then reads the same tensors and metadata.
//!
//! Headers are generated as text from a grammar close to what writers produce (so that
//! about half are valid), then perturbed: repeated names, `null`/odd metadata, every dtype
//! name plus invalid ones, sub-byte dtypes, shapes that overflow, offsets that gap, overlap
//! or run past the data, unknown fields (also nested deeper than the JSON parser allows),
//! entries written as arrays, a wrong length prefix, trailing or missing data.
//!
//! 512 cases by default; set `PROPTEST_CASES` for a longer run.

use std::collections::BTreeMap;
use std::fs;

use expo::dtype::Dtype;
use expo::header::{read_header, HeaderError, STRICTER_RULES};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const NAMES: [&str; 6] = ["a", "b", "c", "w\"q", "__metadata__", ""];
const BAD_DTYPES: [&str; 4] = ["Q4", "bf16", "F8", "I128"];

#[derive(Debug, Clone)]
struct Entry {
    name: usize,
    dtype: String,
    shape: Vec<u64>,
    /// Added to the computed start and end offsets.
    skew: (i8, i8),
    /// Extra field: none, a shallow one, or one nested `depth` deep.
    extra: Option<usize>,
    /// Written as `[dtype, shape, offsets]` (serde accepts sequences for structs).
    as_array: bool,
}

#[derive(Debug, Clone)]
struct Case {
    metadata: Option<&'static str>,
    /// Where in the entry list `__metadata__` goes.
    metadata_at: usize,
    entries: Vec<Entry>,
    /// Added to the data length the entries cover.
    data_skew: i8,
    /// Replaces the length prefix when set.
    prefix: Option<u64>,
    /// Spaces after the JSON (writers pad to 8 bytes).
    padding: usize,
}

fn dtype_strategy() -> impl Strategy<Value = String> {
    let good: Vec<String> = Dtype::ALL.iter().map(|d| d.name().to_string()).collect();
    let bad: Vec<String> = BAD_DTYPES.iter().map(|s| s.to_string()).collect();
    prop_oneof![
        10 => prop::sample::select(good),
        1 => prop::sample::select(bad),
    ]
}

fn entry_strategy() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![8 => 0..3usize, 1 => 3..NAMES.len()],
        dtype_strategy(),
        prop_oneof![
            12 => prop::collection::vec(0..4u64, 0..3),
            1 => Just(vec![1 << 32, 1 << 32, 16]),
            1 => Just(vec![3]),
        ],
        prop_oneof![12 => Just((0i8, 0i8)), 1 => (-2..3i8, -2..3i8)],
        prop_oneof![12 => Just(None), 1 => Just(Some(1)), 1 => Just(Some(200))],
        prop::bool::weighted(0.05),
    )
        .prop_map(|(name, dtype, shape, skew, extra, as_array)| Entry {
            name,
            dtype,
            shape,
            skew,
            extra,
            as_array,
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![
            None,
            None,
            Some(r#"{"format":"pt"}"#),
            Some("null"),
            Some("{}"),
            Some(r#"{"format":1}"#),
            Some(r#""pt""#),
        ]),
        0..4usize,
        prop::collection::vec(entry_strategy(), 0..5),
        prop_oneof![10 => Just(0i8), 1 => -2..3i8],
        prop_oneof![20 => Just(None), 1 => Just(Some(u64::MAX)), 1 => Just(Some(1))],
        0..8usize,
    )
        .prop_map(
            |(metadata, metadata_at, entries, data_skew, prefix, padding)| Case {
                metadata,
                metadata_at,
                entries,
                data_skew,
                prefix,
                padding,
            },
        )
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// The file bytes, and whether JSON nested past serde_json's limit was written (the only
/// refusal expo cannot word better than the crate does).
fn render(case: &Case) -> (Vec<u8>, bool) {
    let mut parts = Vec::new();
    let mut offset = 0i64;
    let mut deep = false;
    for e in &case.entries {
        let bits = Dtype::from_name(&e.dtype).map_or(8, |d| d.bits());
        let bytes = e
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(bits))
            .map_or(4, |b| b.div_ceil(8)) as i64;
        let start = (offset + e.skew.0 as i64).max(0);
        let end = (offset + bytes + e.skew.1 as i64).max(0);
        offset = end.max(offset);
        let name = serde_json::to_string(NAMES[e.name]).unwrap();
        let shape = serde_json::to_string(&e.shape).unwrap();
        let value = if e.as_array {
            format!(r#"["{}",{shape},[{start},{end}]]"#, e.dtype)
        } else {
            let extra = match e.extra {
                None => String::new(),
                Some(depth) => {
                    deep |= depth > 100;
                    format!(r#","extra":{}"#, nested(depth))
                }
            };
            format!(
                r#"{{"dtype":"{}","shape":{shape},"data_offsets":[{start},{end}]{extra}}}"#,
                e.dtype
            )
        };
        parts.push(format!("{name}:{value}"));
    }
    if let Some(meta) = case.metadata {
        let at = case.metadata_at.min(parts.len());
        parts.insert(at, format!(r#""__metadata__":{meta}"#));
    }
    let mut header = format!("{{{}}}", parts.join(","));
    header.push_str(&" ".repeat(case.padding));
    let data_len = (offset + case.data_skew as i64).max(0) as usize;
    let prefix = case.prefix.unwrap_or(header.len() as u64);
    let mut bytes = prefix.to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    (bytes, deep)
}

/// (name, dtype, shape, start, end) of every tensor, sorted.
type Table = Vec<(String, String, Vec<u64>, u64, u64)>;

#[derive(Debug, Default)]
struct Counts {
    both_accept: usize,
    both_refuse: usize,
    stricter: usize,
}

#[test]
fn expo_accepts_a_header_iff_the_safetensors_crate_does_except_for_its_stricter_rules() {
    assert_eq!(
        STRICTER_RULES.len(),
        2,
        "update this test with the rule list"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let counts = std::cell::RefCell::new(Counts::default());
    runner
        .run(&case_strategy(), |case| {
            let (bytes, deep) = render(&case);
            fs::write(&path, &bytes).unwrap();
            let ours = read_header(&path);
            let theirs = safetensors::SafeTensors::read_metadata(&bytes);
            let mut counts = counts.borrow_mut();
            match (ours, theirs) {
                (Ok(header), Ok((n, meta))) => {
                    counts.both_accept += 1;
                    prop_assert_eq!(header.data_start, 8 + n as u64);
                    let mut want: Table = meta
                        .tensors()
                        .into_iter()
                        .map(|(name, t)| {
                            (
                                name,
                                t.dtype.to_string(),
                                t.shape.iter().map(|&d| d as u64).collect(),
                                t.data_offsets.0 as u64,
                                t.data_offsets.1 as u64,
                            )
                        })
                        .collect();
                    want.sort();
                    let mut got: Table = header
                        .tensors
                        .iter()
                        .map(|t| {
                            (
                                t.name.clone(),
                                t.dtype.name().to_string(),
                                t.shape.clone(),
                                t.start,
                                t.end,
                            )
                        })
                        .collect();
                    got.sort();
                    prop_assert_eq!(got, want);
                    let want_meta: Option<BTreeMap<String, String>> = meta
                        .metadata()
                        .as_ref()
                        .map(|m| m.clone().into_iter().collect());
                    prop_assert_eq!(header.metadata, want_meta);
                }
                (Err(e), Ok(_)) => {
                    counts.stricter += 1;
                    prop_assert!(
                        e.is_stricter_rule(),
                        "expo refused a header the crate accepts, by no listed rule: {e}"
                    );
                }
                (Ok(_), Err(e)) => {
                    return Err(TestCaseError::fail(format!(
                        "expo accepted a header the crate refuses ({e})"
                    )))
                }
                (Err(e), Err(_)) => {
                    counts.both_refuse += 1;
                    if !deep {
                        prop_assert!(
                            !matches!(e, HeaderError::Refused { .. }),
                            "expo did not say which tensor or rule: {e}"
                        );
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    let counts = counts.into_inner();
    assert!(
        counts.both_accept > cases as usize / 5
            && counts.both_refuse > cases as usize / 10
            && counts.stricter > 0,
        "the generator no longer covers both sides: {counts:?}"
    );
}

#[test]
fn a_repeated_name_is_the_stricter_rule_the_crate_lacks() {
    // Accepted by the crate (it keeps the last entry), refused by expo.
    let header = r#"{"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.push(0);
    assert!(safetensors::SafeTensors::read_metadata(&bytes).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    fs::write(&path, &bytes).unwrap();
    let err = read_header(&path).unwrap_err();
    assert!(
        matches!(&err, HeaderError::DuplicateTensor { tensor } if tensor == "a"),
        "{err}"
    );
}
