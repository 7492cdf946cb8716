//! Laying out the output: the tensors of θ0 and θ1 paired (by [`crate::pairing`]), each
//! tensor's α from the per-module rules, and the output shards with their headers.
//!
//! Planning reads nothing but headers, so every mismatch is found before a byte is written.

use std::collections::BTreeMap;
use std::fmt;

use crate::checkpoint::{Checkpoint, Layout, TensorLoc};
use crate::dtype::Dtype;
use crate::header::encode_header;
use crate::kernel::KernelSpec;
use crate::pairing::{self, PairingError, Purpose, Side};
use crate::text::number;
pub use crate::writer::ShardPlan;
use crate::writer::{cut_tasks, Task, CHUNK_ELEMENTS, COPY_CHUNK_BYTES};

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

/// The rules of a run in the order they are tried: `--skip` rules (α = 0) first, so that a
/// skipped tensor stays θ1's whatever `--alpha-for` says, then `--alpha-for` rules; the
/// first that matches a tensor sets its α.
pub fn rule_chain(skip: &[AlphaRule], alpha_for: &[AlphaRule]) -> Vec<AlphaRule> {
    skip.iter().chain(alpha_for).cloned().collect()
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

/// Which input a stored tensor is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// --sft, θ0.
    Sft,
    /// --aligned: θ1, or the adapter.
    Aligned,
}

/// How one output tensor is made, whatever the kind of --aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// Stored bytes, copied (θ0's, or an adapter tensor's).
    Copy { from: Input, loc: TensorLoc },
    /// A tensor of two paired checkpoints: θ1 + α(θ1 − θ0) with `spec` (a float tensor), or
    /// θ1's bytes (`spec` is `None`); at α = 0 a float tensor is copied or cast (see
    /// [`Recipe::treatment`]).
    Pair {
        sft: TensorLoc,
        aligned: TensorLoc,
        spec: Option<KernelSpec>,
    },
    /// θ0 + (1+α)·ΔW of LoRA module `module` (`rows` × `cols`, or DoRA's
    /// (1+α)·W1 − α·W0), in row blocks.
    LoraRows {
        module: usize,
        base: TensorLoc,
        rows: u64,
        cols: u64,
    },
    /// θ0 + (1+α)·s·lora_B.bias.
    LoraBias { module: usize, base: TensorLoc },
    /// θ1 + α(θ1 − θ0) for the adapter's full tensor `full` (modules_to_save) over θ0 at
    /// `base`, in the output tensor's dtype. With `zero_copies`, α = 0 copies θ1's bytes.
    AdapterFull {
        full: usize,
        base: TensorLoc,
        zero_copies: bool,
    },
    /// A lora_B factor (or lora_B.bias) of the adapter at `loc` times (1+α); α = 0 copies.
    ScaledB { loc: TensorLoc },
}

impl Recipe {
    /// What a paired tensor amounts to at `alpha`: copy, cast or extrapolate (see
    /// [`pairing::treatment_at`]). Other recipes are not paired tensors: `Copy`.
    pub fn treatment(&self, alpha: f64) -> Treatment {
        match *self {
            Recipe::Pair { spec, .. } => pairing::treatment_at(spec, alpha),
            _ => Treatment::Copy,
        }
    }
}

/// One tensor of the output.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Bytes of output data.
    pub len: u64,
    pub recipe: Recipe,
    /// The name `--skip`/`--alpha-for` match for this tensor's α; `None`: α is 0.
    pub alpha_name: Option<String>,
}

impl OutTensor {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Whether θ0's bytes must equal θ1's at `alpha` (see [`pairing::must_be_identical`]).
    pub fn must_be_identical(&self, alpha: f64) -> bool {
        matches!(self.recipe, Recipe::Pair { .. })
            && pairing::must_be_identical(self.recipe.treatment(alpha), self.dtype, alpha)
    }
}

/// THE output plan of every kind of --aligned: the output's tensors with their recipes,
/// its files and its index — the same for every α of a run (each output's α per tensor
/// comes from [`OutputPlan::alphas`]).
#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub tensors: Vec<OutTensor>,
    pub shards: Vec<ShardPlan>,
    /// File name and contents of the index, when one is written.
    pub index: Option<(String, Vec<u8>)>,
}

impl OutputPlan {
    /// Total bytes of all output files.
    pub fn output_bytes(&self) -> u64 {
        self.shards.iter().map(ShardPlan::file_len).sum::<u64>()
            + self.index.as_ref().map_or(0, |(_, b)| b.len() as u64)
    }

    /// Bytes of tensor data written.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_len).sum()
    }

    /// Each tensor's α in the output whose rules give `alpha_of`.
    pub fn alphas(&self, alpha_of: &dyn Fn(&str) -> f64) -> Vec<f64> {
        self.tensors
            .iter()
            .map(|t| t.alpha_name.as_deref().map_or(0.0, alpha_of))
            .collect()
    }

    /// Number of tensors of each treatment in the output whose tensors' α are `alphas`:
    /// (extrapolated, cast, copied).
    pub fn counts(&self, alphas: &[f64]) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (t, &alpha) in self.tensors.iter().zip(alphas) {
            match t.recipe.treatment(alpha) {
                Treatment::Extrapolate(_) => c.0 += 1,
                Treatment::Cast(_) => c.1 += 1,
                Treatment::Copy => c.2 += 1,
            }
        }
        c
    }

    /// The work in file order, for a run of `outputs` outputs: LoRA weights by whole
    /// register blocks of rows, float tensors by elements, copies by bytes. Adapter tasks of
    /// `outputs` outputs are `outputs` times smaller (a worker keeps one buffer per output,
    /// so its buffers stay the size of one output's chunk; each row's arithmetic is the same
    /// whatever rows share its task).
    pub fn tasks(&self, outputs: usize) -> Vec<Task> {
        let chunk = (CHUNK_ELEMENTS / outputs.max(1) as u64).max(1);
        cut_tasks(&self.shards, |i| {
            let t = &self.tensors[i];
            let elem = t.dtype.bits() / 8;
            match t.recipe {
                Recipe::Pair { spec: Some(_), .. } => (t.elements(), CHUNK_ELEMENTS, elem),
                Recipe::Pair { spec: None, .. } | Recipe::Copy { .. } => {
                    (t.len, COPY_CHUNK_BYTES, 1)
                }
                Recipe::LoraRows { rows, cols, .. } => {
                    let cols = cols.max(1);
                    // Whole register blocks of rows per task (see adapter/rows.rs).
                    let step = (chunk / cols).max(1);
                    let step = if step >= 8 { step / 8 * 8 } else { step };
                    (rows, step, cols * elem)
                }
                Recipe::LoraBias { .. } | Recipe::AdapterFull { .. } | Recipe::ScaledB { .. } => {
                    (t.elements(), chunk, elem)
                }
            }
        })
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

/// Pairs every tensor of θ1 with θ0's tensor of the same name at the run's α (the rules
/// checked first) and decides how to produce it. The result is in θ1's order, and the same
/// for every α that pairs.
pub fn pair_for_output(
    sft: &Checkpoint,
    aligned: &Checkpoint,
    opts: &PlanOptions,
) -> Result<Vec<OutTensor>, PlanError> {
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
            let (spec, dtype) = pairing::output_of(&e, opts.dtype);
            let len = match spec {
                None => e.len,
                Some(_) => e.elements() * dtype.bits() / 8,
            };
            OutTensor {
                recipe: Recipe::Pair {
                    sft: e.locs[0],
                    aligned: e.locs[1],
                    spec,
                },
                alpha_name: Some(e.name.clone()),
                name: e.name,
                shape: e.shape,
                dtype,
                len,
            }
        })
        .collect())
}

/// The outputs, among those whose tensors' α are `alphas` (outputs of one plan), whose
/// tensors that must be identical on both sides ([`OutTensor::must_be_identical`]) cover
/// those of every output: the first, then each one that adds a tensor (with a sweep that
/// includes α = 0, the α = 0 output checks fewer tensors than the others).
pub fn outputs_to_verify<'a>(
    plan: &OutputPlan,
    alphas: impl IntoIterator<Item = &'a [f64]>,
) -> Vec<usize> {
    let mut covered = vec![false; plan.tensors.len()];
    let mut chosen = Vec::new();
    for (j, alphas) in alphas.into_iter().enumerate() {
        let must: Vec<bool> = plan
            .tensors
            .iter()
            .zip(alphas)
            .map(|(t, &a)| t.must_be_identical(a))
            .collect();
        let adds = must.iter().zip(&covered).any(|(&m, &c)| m && !c);
        if chosen.is_empty() || adds {
            covered.iter_mut().zip(&must).for_each(|(c, &m)| *c |= m);
            chosen.push(j);
        }
    }
    chosen
}

/// A shard header's `__metadata__`.
type Metadata = Option<BTreeMap<String, String>>;

/// Builds the whole plan of two paired checkpoints at `opts.alpha`: tensors, output shards
/// with their headers, and the index.
pub fn build_plan(
    sft: &Checkpoint,
    aligned: &Checkpoint,
    opts: &PlanOptions,
) -> Result<OutputPlan, PlanError> {
    let tensors = pair_for_output(sft, aligned, opts)?;
    Ok(lay_out_pairs(aligned, opts.max_shard_size, tensors))
}

/// The files of paired tensors `tensors` (from [`pair_for_output`]): θ1's, or re-sharded to
/// at most `max_shard_size` tensor bytes per file.
pub fn lay_out_pairs(
    aligned: &Checkpoint,
    max_shard_size: Option<u64>,
    tensors: Vec<OutTensor>,
) -> OutputPlan {
    let groups = match max_shard_size {
        None => mirror_groups(aligned, &tensors),
        Some(max) => packed_groups(aligned, &tensors, max),
    };
    let shards: Vec<ShardPlan> = groups
        .into_iter()
        .map(|(file_name, metadata, ids)| shard_plan(&tensors, file_name, metadata, ids))
        .collect();
    let index = index_file(aligned, max_shard_size, &tensors, &shards);
    OutputPlan {
        tensors,
        shards,
        index,
    }
}

/// Which output file each pair goes to, as (file name, metadata, pair indices).
type Groups = Vec<(String, Metadata, Vec<usize>)>;

/// θ1's files, each with the tensors it holds.
fn mirror_groups(aligned: &Checkpoint, pairs: &[OutTensor]) -> Groups {
    let mut groups: Groups = aligned
        .shards
        .iter()
        .map(|s| (s.name.clone(), s.header.metadata.clone(), Vec::new()))
        .collect();
    for (i, p) in pairs.iter().enumerate() {
        if let Recipe::Pair { aligned, .. } = p.recipe {
            groups[aligned.shard].2.push(i);
        }
    }
    groups
}

/// Files of at most `max` tensor bytes, filled greedily in θ1's order (a larger tensor
/// gets a file of its own).
fn packed_groups(aligned: &Checkpoint, pairs: &[OutTensor], max: u64) -> Groups {
    let metadata = aligned
        .shards
        .first()
        .and_then(|s| s.header.metadata.clone());
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, p) in pairs.iter().enumerate() {
        match bins.last_mut() {
            Some(bin) if current + p.len <= max => {
                bin.push(i);
                current += p.len;
            }
            _ => {
                bins.push(vec![i]);
                current = p.len;
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
    pairs: &[OutTensor],
    file_name: String,
    metadata: Metadata,
    tensors: Vec<usize>,
) -> ShardPlan {
    lay_out_shard(file_name, metadata.as_ref(), tensors, |i| {
        let p = &pairs[i];
        (p.name.as_str(), p.dtype, p.shape.as_slice(), p.len)
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
    pairs: &[OutTensor],
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
        let o = opts(0.4, rules, None);
        let plan = build_plan(&a, &b, &o).unwrap();
        let alphas = plan.alphas(&|n| o.alpha_for(n).0);
        // (α, treatment, rule) of a tensor.
        let by_name = |n: &str| {
            let i = plan.tensors.iter().position(|p| p.name == n).unwrap();
            let t = plan.tensors[i].recipe.treatment(alphas[i]);
            (alphas[i], t, o.alpha_for(n).1)
        };
        assert_eq!(by_name("model.embed_tokens.weight").0, 0.0);
        assert_eq!(by_name("model.embed_tokens.weight").1, Treatment::Copy);
        assert_eq!(by_name("lm_head.weight").2, Some(0));
        assert_eq!(by_name("model.layers.0.self_attn.q_proj.weight").0, 0.2);
        // "mlp=2" comes before "up_proj=7": the first match wins.
        assert_eq!(by_name("model.layers.0.mlp.up_proj.weight").0, 2.0);
        assert_eq!(by_name("model.layers.0.mlp.up_proj.bias").2, Some(2));
        assert!(matches!(
            by_name("model.layers.0.mlp.up_proj.bias").1,
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
        // The plan and each tensor's α at `alpha` with `rules`.
        let plan = |alpha, rules| {
            let o = opts(alpha, rules, None);
            let plan = build_plan(&a, &b, &o).unwrap();
            let alphas = plan.alphas(&|n| o.alpha_for(n).0);
            (plan, alphas)
        };
        let must = |(p, alphas): &(OutputPlan, Vec<f64>)| -> Vec<bool> {
            p.tensors
                .iter()
                .zip(alphas)
                .map(|(t, &a)| t.must_be_identical(a))
                .collect()
        };
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
        let chosen = outputs_to_verify(&zero.0, [&zero.1[..], &some.1[..]]);
        assert_eq!(chosen.len(), 2);
        assert_eq!(chosen[1], 1);
        let chosen = outputs_to_verify(&zero.0, [&some.1[..], &zero.1[..], &some.1[..]]);
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
