//! Laying out the output: the tensors of θ0 and θ1 paired (by [`crate::pairing`]), each
//! tensor's α from the per-module rules, and the output shards with their headers.
//!
//! Planning reads nothing but headers, so every mismatch is found before a byte is written.

use std::collections::BTreeMap;
use std::fmt;

use crate::checkpoint::{Checkpoint, Layout, TensorLoc};
use crate::dtype::Dtype;
use crate::header::encode_header;
use crate::pairing::{self, PairingError, Purpose, Side};
use crate::text::number;

pub use crate::pairing::{DtypeChoice, Treatment};

/// Name of the index file written for multi-shard output.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// How messages name the two checkpoints of a plan.
pub const SIDE_LABELS: [&str; 2] = ["--sft", "--aligned"];

/// What a per-module rule sets a tensor's α to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleValue {
    /// This α, whatever the run's α.
    Absolute(f64),
    /// This multiple of the run's α (`x0.5`).
    Factor(f64),
}

/// A per-module rule: tensors whose name matches `pattern` get `value` as their α.
#[derive(Debug, Clone)]
pub struct AlphaRule {
    pub pattern: regex::Regex,
    pub value: RuleValue,
    /// The rule as the user wrote it, for messages and provenance.
    pub spelling: String,
}

impl AlphaRule {
    /// The α this rule gives a tensor in a run with `alpha`.
    pub fn alpha(&self, alpha: f64) -> f64 {
        match self.value {
            RuleValue::Absolute(a) => a,
            RuleValue::Factor(f) => f * alpha,
        }
    }
}

/// The validated settings planning needs.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The run's α.
    pub alpha: f64,
    pub dtype: DtypeChoice,
    /// Re-shard with at most this many tensor bytes per file; `None` mirrors θ1.
    pub max_shard_size: Option<u64>,
    /// Per-module rules, in priority order: the first whose pattern matches a tensor's
    /// name sets its α.
    pub rules: Vec<AlphaRule>,
}

/// A per-module rule gives an α that is not a usable number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AlphaError {
    #[error("{rule} at alpha = {alpha}: {factor} × {alpha} underflows to 0; give the rule its α directly (REGEX=VALUE) or use a larger factor")]
    Underflow {
        rule: String,
        alpha: Short,
        factor: Short,
    },
    #[error(
        "{rule} at alpha = {alpha}: {factor} × {alpha} overflows to infinity; use a smaller factor"
    )]
    Overflow {
        rule: String,
        alpha: Short,
        factor: Short,
    },
}

/// A number printed short in a message (see [`crate::text::number`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Short(pub f64);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&number(self.0))
    }
}

impl PlanOptions {
    /// Checks that every `xF` rule gives a finite α, and 0 only when F or the run's α is 0.
    pub fn check_alphas(&self) -> Result<(), AlphaError> {
        for r in &self.rules {
            let RuleValue::Factor(f) = r.value else {
                continue;
            };
            let (rule, alpha, factor) = (r.spelling.clone(), Short(self.alpha), Short(f));
            let a = r.alpha(self.alpha);
            if !a.is_finite() {
                return Err(AlphaError::Overflow {
                    rule,
                    alpha,
                    factor,
                });
            }
            if a == 0.0 && f != 0.0 && self.alpha != 0.0 {
                return Err(AlphaError::Underflow {
                    rule,
                    alpha,
                    factor,
                });
            }
        }
        Ok(())
    }

    /// The α of tensor `name` and the index of the rule that set it, if any.
    pub fn alpha_for(&self, name: &str) -> (f64, Option<usize>) {
        alpha_of(&self.rules, self.alpha, name)
    }
}

/// THE "α of this tensor" rule, for every kind of --aligned: the first of `rules` whose
/// pattern matches `name` sets it (its index is returned), else it is the run's `alpha`.
pub fn alpha_of(rules: &[AlphaRule], alpha: f64, name: &str) -> (f64, Option<usize>) {
    match rules.iter().position(|r| r.pattern.is_match(name)) {
        Some(i) => (rules[i].alpha(alpha), Some(i)),
        None => (alpha, None),
    }
}

/// One output tensor and where its inputs live.
#[derive(Debug, Clone)]
pub struct TensorPair {
    pub name: String,
    pub shape: Vec<u64>,
    pub out_dtype: Dtype,
    pub treatment: Treatment,
    pub sft: TensorLoc,
    pub aligned: TensorLoc,
    /// Bytes of output data.
    pub out_len: u64,
    /// This tensor's α (the run's, or a rule's).
    pub alpha: f64,
    /// The per-module rule that set `alpha`, as an index into [`PlanOptions::rules`].
    pub rule: Option<usize>,
}

impl TensorPair {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Whether θ0's bytes must equal θ1's (see [`pairing::must_be_identical`]).
    pub fn must_be_identical(&self) -> bool {
        pairing::must_be_identical(self.treatment, self.out_dtype, self.alpha)
    }
}

/// One output file: which tensors, in which order, at which offsets.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub file_name: String,
    /// Indices into [`Plan::pairs`], in data order.
    pub tensors: Vec<usize>,
    /// Offset of each tensor's data relative to the data section, parallel to `tensors`.
    pub offsets: Vec<u64>,
    /// The encoded header, including the 8-byte length prefix.
    pub header: Vec<u8>,
    /// Bytes of tensor data.
    pub data_len: u64,
}

impl ShardPlan {
    /// Size of the whole file.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }
}

/// Everything the engine needs to write the output.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pairs: Vec<TensorPair>,
    pub shards: Vec<ShardPlan>,
    /// File name and contents of the index, when one is written.
    pub index: Option<(String, Vec<u8>)>,
    pub alpha: f64,
}

impl Plan {
    /// Total bytes of all output files.
    pub fn output_bytes(&self) -> u64 {
        self.shards.iter().map(ShardPlan::file_len).sum::<u64>()
            + self.index.as_ref().map_or(0, |(_, b)| b.len() as u64)
    }

    /// Bytes of tensor data written.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_len).sum()
    }

    /// Number of tensors with each treatment: (extrapolated, cast, copied).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for p in &self.pairs {
            match p.treatment {
                Treatment::Extrapolate(_) => c.0 += 1,
                Treatment::Cast(_) => c.1 += 1,
                Treatment::Copy => c.2 += 1,
            }
        }
        c
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlanError {
    /// A usage error: a rule's α is not a usable number.
    #[error(transparent)]
    Alpha(#[from] AlphaError),
    #[error(transparent)]
    Pairing(#[from] PairingError),
}

/// Pairs every tensor of θ1 with θ0's tensor of the same name and decides how to produce
/// it. The result is in θ1's order.
pub fn pair_for_output(
    sft: &Checkpoint,
    aligned: &Checkpoint,
    opts: &PlanOptions,
) -> Result<Vec<TensorPair>, PlanError> {
    opts.check_alphas()?;
    let sides = [
        Side {
            checkpoint: sft,
            label: SIDE_LABELS[0],
        },
        Side {
            checkpoint: aligned,
            label: SIDE_LABELS[1],
        },
    ];
    let who = format!("{} and {}", SIDE_LABELS[0], SIDE_LABELS[1]);
    let entries = pairing::pair(&sides, &who, |name| Purpose::Produce {
        alpha: opts.alpha_for(name).0,
    })?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let (alpha, rule) = opts.alpha_for(&e.name);
            let (treatment, out_dtype) = pairing::treatment(&e, alpha, opts.dtype);
            let out_len = match treatment {
                Treatment::Copy => e.len,
                _ => e.elements() * out_dtype.bits() / 8,
            };
            TensorPair {
                sft: e.locs[0],
                aligned: e.locs[1],
                name: e.name,
                shape: e.shape,
                out_dtype,
                treatment,
                out_len,
                alpha,
                rule,
            }
        })
        .collect())
}

/// The plans, among `plans` (outputs of one run, sharing one layout), whose tensors that
/// must be identical on both sides ([`TensorPair::must_be_identical`]) cover those of every
/// plan: the first plan, then each one that adds a tensor (with a sweep that includes
/// α = 0, the α = 0 output checks fewer tensors than the others).
pub fn plans_to_verify<'a>(plans: impl IntoIterator<Item = &'a Plan>) -> Vec<&'a Plan> {
    let mut covered: Vec<bool> = Vec::new();
    let mut chosen = Vec::new();
    for plan in plans {
        covered.resize(covered.len().max(plan.pairs.len()), false);
        let adds = plan
            .pairs
            .iter()
            .enumerate()
            .any(|(i, p)| p.must_be_identical() && !covered[i]);
        if chosen.is_empty() || adds {
            for (i, p) in plan.pairs.iter().enumerate() {
                covered[i] |= p.must_be_identical();
            }
            chosen.push(plan);
        }
    }
    chosen
}

/// A shard header's `__metadata__`.
type Metadata = Option<BTreeMap<String, String>>;

/// Builds the whole plan: pairs, output shards with their headers, and the index.
pub fn build_plan(
    sft: &Checkpoint,
    aligned: &Checkpoint,
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    let pairs = pair_for_output(sft, aligned, opts)?;
    let groups = match opts.max_shard_size {
        None => mirror_groups(aligned, &pairs),
        Some(max) => packed_groups(aligned, &pairs, max),
    };
    let shards: Vec<ShardPlan> = groups
        .into_iter()
        .map(|(file_name, metadata, tensors)| shard_plan(&pairs, file_name, metadata, tensors))
        .collect();
    let index = index_file(aligned, opts.max_shard_size, &pairs, &shards);
    Ok(Plan {
        pairs,
        shards,
        index,
        alpha: opts.alpha,
    })
}

/// Which output file each pair goes to, as (file name, metadata, pair indices).
type Groups = Vec<(String, Metadata, Vec<usize>)>;

/// θ1's files, each with the tensors it holds.
fn mirror_groups(aligned: &Checkpoint, pairs: &[TensorPair]) -> Groups {
    let mut groups: Groups = aligned
        .shards
        .iter()
        .map(|s| (s.name.clone(), s.header.metadata.clone(), Vec::new()))
        .collect();
    for (i, p) in pairs.iter().enumerate() {
        groups[p.aligned.shard].2.push(i);
    }
    groups
}

/// Files of at most `max` tensor bytes, filled greedily in θ1's order (a larger tensor
/// gets a file of its own).
fn packed_groups(aligned: &Checkpoint, pairs: &[TensorPair], max: u64) -> Groups {
    let metadata = aligned
        .shards
        .first()
        .and_then(|s| s.header.metadata.clone());
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, p) in pairs.iter().enumerate() {
        match bins.last_mut() {
            Some(bin) if current + p.out_len <= max => {
                bin.push(i);
                current += p.out_len;
            }
            _ => {
                bins.push(vec![i]);
                current = p.out_len;
            }
        }
    }
    if bins.is_empty() {
        bins.push(Vec::new());
    }
    let n = bins.len();
    bins.into_iter()
        .enumerate()
        .map(|(k, bin)| {
            let name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            };
            (name, metadata.clone(), bin)
        })
        .collect()
}

/// One output file: its tensors laid out in order after the encoded header.
fn shard_plan(
    pairs: &[TensorPair],
    file_name: String,
    metadata: Metadata,
    tensors: Vec<usize>,
) -> ShardPlan {
    lay_out_shard(file_name, metadata.as_ref(), tensors, |i| {
        let p = &pairs[i];
        (p.name.as_str(), p.out_dtype, p.shape.as_slice(), p.out_len)
    })
}

/// One output file of any front-end: the tensors `tensors` (described by `entry`: name,
/// dtype, shape, bytes) laid out in order after the encoded header.
pub fn lay_out_shard<'a>(
    file_name: String,
    metadata: Option<&BTreeMap<String, String>>,
    tensors: Vec<usize>,
    entry: impl Fn(usize) -> (&'a str, Dtype, &'a [u64], u64),
) -> ShardPlan {
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut cursor = 0u64;
    let mut entries = Vec::with_capacity(tensors.len());
    for &i in &tensors {
        let (name, dtype, shape, len) = entry(i);
        offsets.push(cursor);
        entries.push((name, dtype, shape, cursor, cursor + len));
        cursor += len;
    }
    let header = encode_header(metadata, &entries);
    ShardPlan {
        file_name,
        tensors,
        offsets,
        header,
        data_len: cursor,
    }
}

/// The index file, when one is written: always when θ1 has one and is mirrored, and when
/// re-sharding makes several files. θ1's index metadata is kept, `total_size` updated.
fn index_file(
    aligned: &Checkpoint,
    max_shard_size: Option<u64>,
    pairs: &[TensorPair],
    shards: &[ShardPlan],
) -> Option<(String, Vec<u8>)> {
    let write_index = match (&aligned.layout, max_shard_size) {
        (_, Some(_)) => shards.len() > 1,
        (Layout::Indexed { .. }, None) => true,
        (Layout::Single, None) => false,
    };
    if !write_index {
        return None;
    }
    let (name, metadata) = match (&aligned.layout, max_shard_size) {
        (
            Layout::Indexed {
                index_name,
                metadata,
            },
            None,
        ) => (index_name.clone(), metadata.clone()),
        (Layout::Indexed { metadata, .. }, Some(_)) => (INDEX_NAME.to_string(), metadata.clone()),
        (Layout::Single, _) => (INDEX_NAME.to_string(), serde_json::Map::new()),
    };
    Some((name, index_bytes(metadata, shards, |i| &pairs[i].name)))
}

/// An index file's bytes: `metadata` with `total_size` set, and the file of every tensor
/// (`name(i)` names tensor `i` of the shards).
pub fn index_bytes<'a>(
    mut metadata: serde_json::Map<String, serde_json::Value>,
    shards: &[ShardPlan],
    name: impl Fn(usize) -> &'a str,
) -> Vec<u8> {
    let total: u64 = shards.iter().map(|s| s.data_len).sum();
    metadata.insert("total_size".into(), total.into());
    let mut weight_map = serde_json::Map::new();
    for s in shards {
        for &i in &s.tensors {
            weight_map.insert(name(i).to_string(), s.file_name.clone().into());
        }
    }
    let mut doc = serde_json::Map::new();
    doc.insert("metadata".into(), metadata.into());
    doc.insert("weight_map".into(), weight_map.into());
    let mut bytes = serde_json::to_vec_pretty(&doc).expect("JSON values always serialize");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alpha::{parse_rule, parse_skip};
    use crate::pairing::tests::checkpoint;

    fn opts(alpha: f64, rules: Vec<AlphaRule>, max: Option<u64>) -> PlanOptions {
        PlanOptions {
            alpha,
            dtype: DtypeChoice::Auto,
            max_shard_size: max,
            rules,
        }
    }

    const LAYOUT: [(&str, Dtype, &[u64]); 5] = [
        ("model.embed_tokens.weight", Dtype::BF16, &[8, 4]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::BF16,
            &[4, 4],
        ),
        ("model.layers.0.mlp.up_proj.weight", Dtype::BF16, &[8, 4]),
        ("model.layers.0.mlp.up_proj.bias", Dtype::BF16, &[8]),
        ("lm_head.weight", Dtype::BF16, &[8, 4]),
    ];

    #[test]
    fn first_matching_rule_sets_alpha_and_skips_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(&dir.path().join("a"), &LAYOUT);
        let b = checkpoint(&dir.path().join("b"), &LAYOUT);
        let rules = vec![
            parse_skip("embed_tokens|lm_head").unwrap(),
            parse_rule("self_attn=x0.5").unwrap(),
            parse_rule("mlp=2").unwrap(),
            parse_rule("up_proj=7").unwrap(),
        ];
        let plan = build_plan(&a, &b, &opts(0.4, rules, None)).unwrap();
        let by_name = |n: &str| plan.pairs.iter().find(|p| p.name == n).unwrap();
        assert_eq!(by_name("model.embed_tokens.weight").alpha, 0.0);
        assert_eq!(
            by_name("model.embed_tokens.weight").treatment,
            Treatment::Copy
        );
        assert_eq!(by_name("lm_head.weight").rule, Some(0));
        assert_eq!(by_name("model.layers.0.self_attn.q_proj.weight").alpha, 0.2);
        // "mlp=2" comes before "up_proj=7": the first match wins.
        assert_eq!(by_name("model.layers.0.mlp.up_proj.weight").alpha, 2.0);
        assert_eq!(by_name("model.layers.0.mlp.up_proj.bias").rule, Some(2));
        assert!(matches!(
            by_name("model.layers.0.mlp.up_proj.bias").treatment,
            Treatment::Extrapolate(_)
        ));
    }

    #[test]
    fn resharding_packs_greedily_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(&dir.path().join("a"), &LAYOUT);
        let b = checkpoint(&dir.path().join("b"), &LAYOUT);
        // Sizes: 64, 32, 64, 16, 64 bytes.
        let plan = build_plan(&a, &b, &opts(0.3, vec![], Some(100))).unwrap();
        let files: Vec<_> = plan
            .shards
            .iter()
            .map(|s| (s.file_name.as_str(), s.tensors.clone()))
            .collect();
        assert_eq!(
            files,
            vec![
                ("model-00001-of-00003.safetensors", vec![0, 1]),
                ("model-00002-of-00003.safetensors", vec![2, 3]),
                ("model-00003-of-00003.safetensors", vec![4]),
            ]
        );
        assert!(plan.index.is_some());
        // A tensor larger than the limit gets a file of its own.
        let plan = build_plan(&a, &b, &opts(0.3, vec![], Some(10))).unwrap();
        assert_eq!(plan.shards.len(), 5);
        // Everything fits: one model.safetensors and no index.
        let plan = build_plan(&a, &b, &opts(0.3, vec![], Some(1 << 20))).unwrap();
        assert_eq!(plan.shards.len(), 1);
        assert_eq!(plan.shards[0].file_name, "model.safetensors");
        assert!(plan.index.is_none());
    }

    #[test]
    fn integer_tensors_must_match_only_where_their_alpha_is_not_0() {
        let dir = tempfile::tempdir().unwrap();
        let layout = [("w", Dtype::F32, &[2][..]), ("ids", Dtype::I64, &[2][..])];
        let a = checkpoint(&dir.path().join("a"), &layout);
        let b = checkpoint(&dir.path().join("b"), &layout);
        let plan = |alpha, rules| build_plan(&a, &b, &opts(alpha, rules, None)).unwrap();
        let must =
            |p: &Plan| -> Vec<bool> { p.pairs.iter().map(|t| t.must_be_identical()).collect() };
        let (zero, some) = (plan(0.0, vec![]), plan(0.3, vec![]));
        assert_eq!(must(&zero), [false, false]);
        assert_eq!(must(&some), [false, true]);
        assert_eq!(
            must(&plan(0.3, vec![parse_skip("ids").unwrap()])),
            [false, false]
        );
        assert_eq!(
            must(&plan(0.0, vec![parse_rule("ids=1").unwrap()])),
            [false, true]
        );
        // A sweep checks the tensors of every α: here, the plan of 0.3 too.
        let chosen = plans_to_verify([&zero, &some]);
        assert_eq!(chosen.len(), 2);
        assert!(std::ptr::eq(chosen[1], &some));
        let chosen = plans_to_verify([&some, &zero, &some]);
        assert_eq!(chosen.len(), 1);
    }

    #[test]
    fn rules_whose_alpha_is_not_a_usable_number_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(&dir.path().join("a"), &LAYOUT);
        let rule = |r| vec![parse_rule(r).unwrap()];
        let err = |alpha, r| build_plan(&a, &a, &opts(alpha, rule(r), None)).unwrap_err();
        let PlanError::Alpha(e) = err(1e300, "mlp=x1e10") else {
            panic!()
        };
        assert!(matches!(e, AlphaError::Overflow { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "--alpha-for mlp=x1e10 at alpha = 1e300: 1e10 × 1e300 overflows to infinity; use a smaller factor"
        );
        let PlanError::Alpha(e) = err(1e-200, "mlp=x1e-200") else {
            panic!()
        };
        assert!(matches!(e, AlphaError::Underflow { .. }), "{e}");
        // A rule that matches nothing is checked too: the run's α is what is wrong.
        assert!(matches!(err(-1e300, "nothing=x1e10"), PlanError::Alpha(_)));
        // Zeros that were asked for, and factors that stay finite, are fine.
        for (alpha, r) in [
            (0.0, "mlp=x1e300"),
            (0.3, "mlp=x0"),
            (1e300, "mlp=x1"),
            (1e-300, "mlp=x0.5"),
        ] {
            build_plan(&a, &a, &opts(alpha, rule(r), None)).unwrap();
        }
    }

    #[test]
    fn mismatches_are_all_listed() {
        let dir = tempfile::tempdir().unwrap();
        let a = checkpoint(
            &dir.path().join("a"),
            &[
                ("x", Dtype::F32, &[2]),
                ("y", Dtype::I64, &[2]),
                ("only_a", Dtype::F32, &[1]),
                ("z", Dtype::F32, &[3]),
            ],
        );
        let b = checkpoint(
            &dir.path().join("b"),
            &[
                ("x", Dtype::F32, &[3]),
                ("y", Dtype::F32, &[2]),
                ("only_b", Dtype::F32, &[1]),
                ("z", Dtype::F8E4M3, &[3]),
            ],
        );
        let err = build_plan(&a, &b, &opts(0.3, vec![], None)).unwrap_err();
        let text = err.to_string();
        let PlanError::Pairing(err) = err else {
            panic!("{text}")
        };
        assert_eq!(err.mismatches.len(), 5, "{text}");
        for needle in [
            "`x` has shape [2]",
            "`y` is I64 in --sft but F32",
            "`only_a` is in --sft",
            "`only_b` is in --aligned",
            "`z` is F32 in --sft but F8_E4M3",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }
}
