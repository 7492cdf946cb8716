//! Pairing the two checkpoints tensor by tensor and laying out the output shards.
//!
//! Planning reads nothing but headers, so every mismatch is found before a byte is written.

use std::collections::BTreeMap;
use std::fmt;

use crate::checkpoint::{Checkpoint, Layout, TensorLoc};
use crate::dtype::{Dtype, DtypeClass, FloatDtype};
use crate::header::encode_header;
use crate::kernel::KernelSpec;

/// Name of the index file written for multi-shard output.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// What `--dtype` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// Each float tensor keeps θ1's dtype.
    Auto,
    /// Every float tensor is written in this dtype.
    Fixed(FloatDtype),
}

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

impl PlanOptions {
    /// The α of tensor `name` and the index of the rule that set it, if any.
    pub fn alpha_for(&self, name: &str) -> (f64, Option<usize>) {
        match self.rules.iter().position(|r| r.pattern.is_match(name)) {
            Some(i) => (self.rules[i].alpha(self.alpha), Some(i)),
            None => (self.alpha, None),
        }
    }
}

/// How one output tensor is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// θ1 + α(θ1 − θ0), computed in f64 and rounded once.
    Extrapolate(KernelSpec),
    /// θ1 rounded to another float format (α = 0 with `--dtype`).
    Cast(KernelSpec),
    /// θ1's bytes unchanged (non-float tensors, and α = 0).
    Copy,
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

/// One reason the two checkpoints cannot be paired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    OnlyInSft {
        tensor: String,
    },
    OnlyInAligned {
        tensor: String,
    },
    Shape {
        tensor: String,
        sft: Vec<u64>,
        aligned: Vec<u64>,
    },
    Dtype {
        tensor: String,
        sft: Dtype,
        aligned: Dtype,
    },
    Unsupported {
        tensor: String,
        dtype: Dtype,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::OnlyInSft { tensor } => write!(f, "`{tensor}` is in --sft but not in --aligned"),
            Mismatch::OnlyInAligned { tensor } => write!(f, "`{tensor}` is in --aligned but not in --sft"),
            Mismatch::Shape { tensor, sft, aligned } => {
                write!(f, "`{tensor}` has shape {sft:?} in --sft but {aligned:?} in --aligned")
            }
            Mismatch::Dtype { tensor, sft, aligned } => write!(
                f,
                "`{tensor}` is {sft} in --sft but {aligned} in --aligned (only float tensors may differ in dtype)"
            ),
            Mismatch::Unsupported { tensor, dtype } => write!(
                f,
                "`{tensor}` is {dtype}, which expo cannot extrapolate (only F16, BF16, F32 and F64); copy it unchanged from --aligned with --skip or an alpha of 0"
            ),
        }
    }
}

/// The checkpoints do not pair up; lists every problem found.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PairingError {
    pub mismatches: Vec<Mismatch>,
}

/// How many mismatches a message lists before summarising the rest.
const SHOWN_MISMATCHES: usize = 10;

/// Writes "the checkpoints do not match (N problems); are WHO the same architecture?" and
/// the first [`SHOWN_MISMATCHES`] problems, one per line, then how many more there are.
pub(crate) fn write_mismatches<M: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    mismatches: &[M],
    who: &str,
) -> fmt::Result {
    let n = mismatches.len();
    write!(
        f,
        "the checkpoints do not match ({n} problem{}); are {who} the same architecture?",
        if n == 1 { "" } else { "s" }
    )?;
    for m in mismatches.iter().take(SHOWN_MISMATCHES) {
        write!(f, "\n  {m}")?;
    }
    if n > SHOWN_MISMATCHES {
        write!(f, "\n  … and {} more", n - SHOWN_MISMATCHES)?;
    }
    Ok(())
}

impl fmt::Display for PairingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_mismatches(f, &self.mismatches, "--sft and --aligned")
    }
}

/// Pairs every tensor of θ1 with θ0's tensor of the same name and decides how to produce it.
///
/// Tensors are looked up by name, so the two sides may be sharded differently. The result
/// is in θ1's order.
pub fn pair_tensors(
    sft: &Checkpoint,
    aligned: &Checkpoint,
    opts: &PlanOptions,
) -> Result<Vec<TensorPair>, PairingError> {
    let mut mismatches = Vec::new();
    let mut pairs = Vec::with_capacity(aligned.len());
    for (aligned_loc, t1) in aligned.tensors() {
        let (alpha, rule) = opts.alpha_for(&t1.name);
        let Some((sft_loc, t0)) = sft.get(&t1.name) else {
            mismatches.push(Mismatch::OnlyInAligned {
                tensor: t1.name.clone(),
            });
            continue;
        };
        if t0.shape != t1.shape {
            mismatches.push(Mismatch::Shape {
                tensor: t1.name.clone(),
                sft: t0.shape.clone(),
                aligned: t1.shape.clone(),
            });
            continue;
        }
        let treatment = match (t0.dtype.class(), t1.dtype.class()) {
            (DtypeClass::Float(a), DtypeClass::Float(b)) => {
                let out = match opts.dtype {
                    DtypeChoice::Auto => b,
                    DtypeChoice::Fixed(d) => d,
                };
                let spec = KernelSpec {
                    sft: a,
                    aligned: b,
                    out,
                };
                if alpha != 0.0 {
                    Treatment::Extrapolate(spec)
                } else if out == b {
                    Treatment::Copy
                } else {
                    Treatment::Cast(spec)
                }
            }
            (DtypeClass::Exact, DtypeClass::Exact) if t0.dtype == t1.dtype => Treatment::Copy,
            (_, DtypeClass::Opaque) if alpha == 0.0 => Treatment::Copy,
            (DtypeClass::Opaque, _) | (_, DtypeClass::Opaque) if t0.dtype == t1.dtype => {
                mismatches.push(Mismatch::Unsupported {
                    tensor: t1.name.clone(),
                    dtype: t1.dtype,
                });
                continue;
            }
            _ => {
                mismatches.push(Mismatch::Dtype {
                    tensor: t1.name.clone(),
                    sft: t0.dtype,
                    aligned: t1.dtype,
                });
                continue;
            }
        };
        let out_dtype = match treatment {
            Treatment::Extrapolate(spec) | Treatment::Cast(spec) => spec.out.dtype(),
            Treatment::Copy => t1.dtype,
        };
        let out_len = match treatment {
            Treatment::Copy => t1.len(),
            _ => t1.elements() * out_dtype.bits() / 8,
        };
        pairs.push(TensorPair {
            name: t1.name.clone(),
            shape: t1.shape.clone(),
            out_dtype,
            treatment,
            sft: sft_loc,
            aligned: aligned_loc,
            out_len,
            alpha,
            rule,
        });
    }
    for (_, t0) in sft.tensors() {
        if aligned.get(&t0.name).is_none() {
            mismatches.push(Mismatch::OnlyInSft {
                tensor: t0.name.clone(),
            });
        }
    }
    if mismatches.is_empty() {
        Ok(pairs)
    } else {
        Err(PairingError { mismatches })
    }
}

/// A shard header's `__metadata__`.
type Metadata = Option<BTreeMap<String, String>>;

/// Builds the whole plan: pairs, output shards with their headers, and the index.
pub fn build_plan(
    sft: &Checkpoint,
    aligned: &Checkpoint,
    opts: &PlanOptions,
) -> Result<Plan, PairingError> {
    let pairs = pair_tensors(sft, aligned, opts)?;
    // Which output file each pair goes to, as (file name, metadata, pair indices).
    let groups: Vec<(String, Metadata, Vec<usize>)> = match opts.max_shard_size {
        None => {
            let mut groups: Vec<_> = aligned
                .shards
                .iter()
                .map(|s| (s.name.clone(), s.header.metadata.clone(), Vec::new()))
                .collect();
            for (i, p) in pairs.iter().enumerate() {
                groups[p.aligned.shard].2.push(i);
            }
            groups
        }
        Some(max) => {
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
    };

    let shards: Vec<ShardPlan> = groups
        .into_iter()
        .map(|(file_name, metadata, tensors)| {
            let mut offsets = Vec::with_capacity(tensors.len());
            let mut cursor = 0u64;
            let mut entries = Vec::with_capacity(tensors.len());
            for &i in &tensors {
                let p = &pairs[i];
                offsets.push(cursor);
                entries.push((
                    p.name.as_str(),
                    p.out_dtype,
                    p.shape.as_slice(),
                    cursor,
                    cursor + p.out_len,
                ));
                cursor += p.out_len;
            }
            let header = encode_header(metadata.as_ref(), &entries);
            ShardPlan {
                file_name,
                tensors,
                offsets,
                header,
                data_len: cursor,
            }
        })
        .collect();

    let write_index = match (&aligned.layout, opts.max_shard_size) {
        (_, Some(_)) => shards.len() > 1,
        (Layout::Indexed { .. }, None) => true,
        (Layout::Single, None) => false,
    };
    let index = write_index.then(|| {
        let (name, mut metadata) = match (&aligned.layout, opts.max_shard_size) {
            (
                Layout::Indexed {
                    index_name,
                    metadata,
                },
                None,
            ) => (index_name.clone(), metadata.clone()),
            (Layout::Indexed { metadata, .. }, Some(_)) => {
                (INDEX_NAME.to_string(), metadata.clone())
            }
            (Layout::Single, _) => (INDEX_NAME.to_string(), serde_json::Map::new()),
        };
        let total: u64 = shards.iter().map(|s| s.data_len).sum();
        metadata.insert("total_size".into(), total.into());
        let mut weight_map = serde_json::Map::new();
        for s in &shards {
            for &i in &s.tensors {
                weight_map.insert(pairs[i].name.clone(), s.file_name.clone().into());
            }
        }
        let mut doc = serde_json::Map::new();
        doc.insert("metadata".into(), metadata.into());
        doc.insert("weight_map".into(), weight_map.into());
        let mut bytes = serde_json::to_vec_pretty(&doc).expect("JSON values always serialize");
        bytes.push(b'\n');
        (name, bytes)
    });

    Ok(Plan {
        pairs,
        shards,
        index,
        alpha: opts.alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alpha::{parse_rule, parse_skip};

    /// Writes a single-file checkpoint with the given (name, dtype, shape) tensors.
    fn checkpoint(dir: &std::path::Path, tensors: &[(&str, Dtype, &[u64])]) -> Checkpoint {
        std::fs::create_dir_all(dir).unwrap();
        let mut entries = Vec::new();
        let mut cursor = 0;
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<u64>() * dtype.bits() / 8;
            entries.push((*name, *dtype, *shape, cursor, cursor + len));
            cursor += len;
        }
        let mut bytes = encode_header(None, &entries);
        bytes.resize(bytes.len() + cursor as usize, 0);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        Checkpoint::open(dir).unwrap()
    }

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
