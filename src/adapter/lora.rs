//! What an adapter does to its base, module by module, as PEFT's merge computes it.
//!
//! Per adapted module ΔW = s·B·A (s = lora_alpha/r, or lora_alpha/√r with rsLoRA, after
//! `rank_pattern` / `alpha_pattern`). transformers' `Conv1D` stores its weight as [in, out]
//! and embeddings as [vocab, dim]: both receive ΔWᵀ. The orientation is decided from the
//! base tensor's shape (the config's `fan_in_fan_out` is not reliable) and, for a square
//! matrix, from the architecture.
//!
//! Every module is reduced to two f64 factor matrices `left` [r, rows] and `right`
//! [r, cols] in the base tensor's storage orientation, so that
//! ΔW[row, col] = s · Σₖ left[k, row]·right[k, col], summed over k = 0..r in order.

use std::collections::BTreeMap;

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::dtype::{DtypeClass, FloatDtype};
use crate::header::TensorInfo;
use crate::kernel::convert;

use super::config::AdapterConfig;
use super::names::{self, Key, KeyError, Part};

/// Model types whose attention and MLP use transformers' `Conv1D` ([in, out] weights).
pub const CONV1D_MODEL_TYPES: [&str; 4] =
    ["gpt2", "openai-gpt", "decision_transformer", "imagegpt"];
/// Module names of `Conv1D` layers, used for square matrices when the base has no config.
const CONV1D_LEAVES: [&str; 4] = ["c_attn", "c_proj", "c_fc", "q_attn"];

/// How ΔW lies in the base tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// nn.Linear: weight [out, in], ΔW = s·B·A.
    Linear,
    /// transformers' Conv1D: weight [in, out], ΔW = s·(B·A)ᵀ.
    Conv1D,
    /// nn.Embedding: weight [vocab, dim], ΔW = s·(B·A)ᵀ with lora_embedding_A/B.
    Embedding,
}

impl Orientation {
    pub fn name(self) -> &'static str {
        match self {
            Orientation::Linear => "linear",
            Orientation::Conv1D => "conv1d",
            Orientation::Embedding => "embedding",
        }
    }
}

/// One tensor of the adapter file.
#[derive(Debug, Clone)]
pub struct Factor {
    /// The key in the adapter file.
    pub key: String,
    pub loc: TensorLoc,
    pub dtype: FloatDtype,
    pub shape: Vec<u64>,
}

/// One adapted module.
#[derive(Debug, Clone)]
pub struct Module {
    /// Module path without `base_model.model.`.
    pub path: String,
    pub orientation: Orientation,
    pub rank: u64,
    pub lora_alpha: f64,
    pub scaling: f64,
    /// lora_A or lora_embedding_A.
    pub a: Factor,
    /// lora_B or lora_embedding_B.
    pub b: Factor,
    pub bias: Option<Factor>,
    pub magnitude: Option<Factor>,
    /// Base weight tensors that receive ΔW: one, or both halves of tied embeddings.
    pub targets: Vec<String>,
    /// The base bias that `lora_B.bias` moves.
    pub base_bias: Option<String>,
    /// Storage shape of the base weight.
    pub rows: u64,
    pub cols: u64,
}

/// A full tensor stored in the adapter (modules_to_save, a trained bias, a head).
#[derive(Debug, Clone)]
pub struct FullTensor {
    pub key: String,
    /// The key without the wrapper prefix.
    pub name: String,
    pub loc: TensorLoc,
    /// Its θ0 in the base, if there is one; `None` only for tensors `--skip` matches.
    pub base: Option<String>,
}

/// Everything known about an adapter relative to its base.
#[derive(Debug, Clone)]
pub struct AdapterPlan {
    pub modules: Vec<Module>,
    pub full: Vec<FullTensor>,
    /// Adapter tensors by key, to tell what each one is.
    pub roles: BTreeMap<String, Role>,
    pub tied: bool,
}

/// What an adapter tensor is, for `--as adapter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Module `index`, this part.
    Lora { module: usize, part: Part },
    /// Full tensor `index`.
    Full(usize),
}

/// Why an adapter cannot be applied to the base.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("module `{module}`: has {found} but no {missing}; the adapter file is incomplete")]
    MissingFactor {
        module: String,
        found: String,
        missing: &'static str,
    },
    #[error(
        "tensor `{tensor}` is {dtype}, but LoRA factors must be float (bf16, f16, f32 or f64)"
    )]
    NotFloat { tensor: String, dtype: String },
    #[error("tensor `{tensor}` has shape {shape:?}; expected {expected}")]
    Shape {
        tensor: String,
        shape: Vec<u64>,
        expected: String,
    },
    #[error("tensor `{tensor}` has rank {found}, but adapter_config.json gives module `{module}` r = {config}{via}; the config does not describe this file")]
    Rank {
        tensor: String,
        module: String,
        found: u64,
        config: u64,
        via: String,
    },
    #[error("tensor `{tensor}`: no base tensor in --sft matches it (tried {tried}); is --sft the model this adapter was trained on?")]
    NoBase { tensor: String, tried: String },
    #[error("tensor `{tensor}`: its base tensor `{base}` is {dtype} with shape {shape:?}, which {problem}")]
    BaseMismatch {
        tensor: String,
        base: String,
        dtype: String,
        shape: Vec<u64>,
        problem: String,
    },
    #[error("tensor `{tensor}` (lora_bias) needs the base bias `{base}`, which --sft does not have; PEFT cannot merge it either")]
    NoBaseBias { tensor: String, base: String },
    #[error("tensor `{tensor}`: DoRA on an embedding is not supported")]
    DoraEmbedding { tensor: String },
    #[error(
        "base tensor `{base}` is changed by two adapted modules (`{first}` and `{second}`){why}"
    )]
    Twice {
        base: String,
        first: String,
        second: String,
        why: &'static str,
    },
    #[error("full tensor `{tensor}` has no counterpart in --sft (tried {tried}), so there is no θ0 to extrapolate from (a freshly initialised head?); pass --skip '{suggest}' to copy it unchanged")]
    FullWithoutBase {
        tensor: String,
        tried: String,
        suggest: String,
    },
}

/// The base model facts that decide orientation and tying.
#[derive(Debug, Clone, Default)]
pub struct BaseFacts {
    pub model_type: Option<String>,
    /// `tie_word_embeddings` (transformers' default, true, when config.json omits it);
    /// `None` when --sft has no config.json.
    pub tie_word_embeddings: Option<bool>,
}

impl BaseFacts {
    /// Reads `config.json` beside the base weights, if any (capped at 16 MiB).
    pub fn read(base: &Checkpoint) -> BaseFacts {
        if !base.is_dir {
            return BaseFacts::default();
        }
        let Ok(Some(file)) = crate::header::open_regular(&base.root.join("config.json")) else {
            return BaseFacts::default();
        };
        let mut text = String::new();
        if std::io::Read::read_to_string(&mut std::io::Read::take(file, 16 << 20), &mut text)
            .is_err()
        {
            return BaseFacts::default();
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return BaseFacts::default();
        };
        BaseFacts {
            model_type: v["model_type"].as_str().map(str::to_string),
            tie_word_embeddings: Some(v["tie_word_embeddings"].as_bool().unwrap_or(true)),
        }
    }
}

fn float_of(t: &TensorInfo) -> Result<FloatDtype, PlanError> {
    match t.dtype.class() {
        DtypeClass::Float(d) => Ok(d),
        _ => Err(PlanError::NotFloat {
            tensor: t.name.clone(),
            dtype: t.dtype.name().to_string(),
        }),
    }
}

fn factor(
    adapter: &Checkpoint,
    loc: TensorLoc,
    t: &TensorInfo,
    dims: usize,
) -> Result<Factor, PlanError> {
    let dtype = float_of(t)?;
    if t.shape.len() != dims {
        return Err(PlanError::Shape {
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            expected: format!("{dims} dimensions"),
        });
    }
    let _ = adapter;
    Ok(Factor {
        key: t.name.clone(),
        loc,
        dtype,
        shape: t.shape.clone(),
    })
}

/// Finds the base tensor for `name` (relative to the wrapped model).
fn find_base<'a>(base: &'a Checkpoint, name: &str) -> Result<&'a TensorInfo, Vec<String>> {
    let tried = names::base_candidates(name);
    for c in &tried {
        if let Some((_, t)) = base.get(c) {
            return Ok(t);
        }
    }
    Err(tried)
}

fn quote_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Analyses `adapter` against `base`. `skipped(name)` says whether a `--skip` rule
/// matches a base tensor name (or, for a full tensor with no base, its own name).
pub fn analyze(
    adapter: &Checkpoint,
    config: &AdapterConfig,
    base: &Checkpoint,
    facts: &BaseFacts,
    skipped: &dyn Fn(&str) -> bool,
) -> Result<AdapterPlan, PlanError> {
    let (by_module, fulls) = group_keys(adapter)?;
    let tied = facts.tie_word_embeddings == Some(true);
    let tied_group: Vec<String> = if tied {
        base.tensors()
            .map(|(_, t)| t.name.clone())
            .filter(|n| names::is_embedding_name(n) || names::is_head_name(n))
            .collect()
    } else {
        Vec::new()
    };
    let mut cx = Analysis {
        adapter,
        config,
        base,
        facts,
        tied,
        tied_group,
        owner: BTreeMap::new(),
    };
    let mut modules = Vec::new();
    let mut roles = BTreeMap::new();
    for (path, parts) in &by_module {
        let module = cx.module(path, parts)?;
        let index = modules.len();
        for (part, (_, t)) in parts {
            roles.insert(
                t.name.clone(),
                Role::Lora {
                    module: index,
                    part: *part,
                },
            );
        }
        modules.push(module);
    }
    let mut full = Vec::new();
    for (loc, t, name) in fulls {
        let base_name = cx.full_base(&t, &name, skipped)?;
        roles.insert(t.name.clone(), Role::Full(full.len()));
        full.push(FullTensor {
            key: t.name.clone(),
            name,
            loc,
            base: base_name,
        });
    }
    Ok(AdapterPlan {
        modules,
        full,
        roles,
        tied,
    })
}

/// The parts of one adapted module found in the adapter file.
type Parts = BTreeMap<Part, (TensorLoc, TensorInfo)>;

/// A full tensor of the adapter: where, what, and its name in the wrapped model.
type FullKey = (TensorLoc, TensorInfo, String);

/// Sorts the adapter's keys into LoRA modules (by module path) and full tensors.
fn group_keys(adapter: &Checkpoint) -> Result<(BTreeMap<String, Parts>, Vec<FullKey>), PlanError> {
    let mut by_module: BTreeMap<String, Parts> = BTreeMap::new();
    let mut fulls = Vec::new();
    for (loc, t) in adapter.tensors() {
        match names::classify(&t.name)? {
            Key::Lora { module, part } => {
                by_module
                    .entry(module)
                    .or_default()
                    .insert(part, (loc, t.clone()));
            }
            Key::Full { name } => fulls.push((loc, t.clone(), name)),
        }
    }
    Ok((by_module, fulls))
}

/// What the analysis of one adapter knows while it goes through the modules.
struct Analysis<'a> {
    adapter: &'a Checkpoint,
    config: &'a AdapterConfig,
    base: &'a Checkpoint,
    facts: &'a BaseFacts,
    tied: bool,
    /// With tied embeddings: every stored copy of the tied matrix.
    tied_group: Vec<String>,
    /// Which module (or full tensor) changes each base tensor.
    owner: BTreeMap<String, String>,
}

/// `tensor`'s base tensor `base_t` does not fit it.
fn mismatch(tensor: &Factor, base_t: &TensorInfo, problem: String) -> PlanError {
    PlanError::BaseMismatch {
        tensor: tensor.key.clone(),
        base: base_t.name.clone(),
        dtype: base_t.dtype.name().to_string(),
        shape: base_t.shape.clone(),
        problem,
    }
}

impl Analysis<'_> {
    /// One adapted module: its factors, rank, scaling, base weight, orientation, DoRA
    /// magnitude, LoRA bias and the base tensors it changes.
    fn module(&mut self, path: &str, parts: &Parts) -> Result<Module, PlanError> {
        let listed = parts
            .values()
            .map(|(_, t)| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(", ");
        let (embedding, fa, fb) = self.factor_pair(path, parts, &listed)?;
        let rank = fa.shape[0];
        let lora_alpha = self.check_rank(path, &fa, &fb)?;
        let scaling = self.config.scaling(rank, lora_alpha);
        let base_t = self.base_weight(path, &fa)?;
        if !matches!(base_t.dtype.class(), DtypeClass::Float(_)) {
            return Err(mismatch(&fa, &base_t, "is not a float tensor".into()));
        }
        if base_t.shape.len() != 2 {
            let problem = "is not a matrix (LoRA on convolutions is not supported)";
            return Err(mismatch(&fa, &base_t, problem.into()));
        }
        let (rows, cols) = (base_t.shape[0], base_t.shape[1]);
        let orientation = self.orientation(path, embedding, (&fa, &fb), &base_t)?;
        let magnitude = self.magnitude(parts, (path, &listed), embedding, fb.shape[0])?;
        let (bias, base_bias) = self.lora_bias(parts, &fb, &base_t)?;
        let targets = self.targets(&fa, &base_t)?;
        self.claim(path, targets.iter().chain(base_bias.iter()))?;
        Ok(Module {
            path: path.to_string(),
            orientation,
            rank,
            lora_alpha,
            scaling,
            a: fa,
            b: fb,
            bias,
            magnitude,
            targets,
            base_bias,
            rows,
            cols,
        })
    }

    /// The A and B factors (or the embedding's), all of one kind; and whether they are the
    /// embedding's.
    fn factor_pair(
        &self,
        path: &str,
        parts: &Parts,
        listed: &str,
    ) -> Result<(bool, Factor, Factor), PlanError> {
        let get = |p: Part| parts.get(&p);
        let embedding = get(Part::EmbA).is_some() || get(Part::EmbB).is_some();
        let (pa, pb) = if embedding {
            (Part::EmbA, Part::EmbB)
        } else {
            (Part::A, Part::B)
        };
        let (Some(a), Some(b)) = (get(pa), get(pb)) else {
            return Err(PlanError::MissingFactor {
                module: path.to_string(),
                found: listed.to_string(),
                missing: match (get(pa).is_some(), embedding) {
                    (false, false) => "lora_A.weight",
                    (true, false) => "lora_B.weight",
                    (false, true) => "lora_embedding_A",
                    (true, true) => "lora_embedding_B",
                },
            });
        };
        if embedding && (get(Part::A).is_some() || get(Part::B).is_some()) {
            return Err(PlanError::MissingFactor {
                module: path.to_string(),
                found: listed.to_string(),
                missing: "a consistent kind (it mixes lora_A/B with lora_embedding_A/B)",
            });
        }
        let fa = factor(self.adapter, a.0, &a.1, 2)?;
        let fb = factor(self.adapter, b.0, &b.1, 2)?;
        Ok((embedding, fa, fb))
    }

    /// Checks that B's rank is A's and the config's; returns the module's lora_alpha.
    fn check_rank(&self, path: &str, fa: &Factor, fb: &Factor) -> Result<f64, PlanError> {
        let rank = fa.shape[0];
        if fb.shape[1] != rank {
            return Err(PlanError::Shape {
                tensor: fb.key.clone(),
                shape: fb.shape.clone(),
                expected: format!("[_, {rank}] to match `{}` of rank {rank}", fa.key),
            });
        }
        let (config_r, lora_alpha) = self.config.rank_and_alpha(path);
        if config_r != rank {
            let via = self
                .config
                .rank_pattern
                .iter()
                .find(|p| p.matches(path))
                .map_or(String::new(), |p| {
                    format!(" (rank_pattern key `{}`)", p.key)
                });
            return Err(PlanError::Rank {
                tensor: fa.key.clone(),
                module: path.to_string(),
                found: rank,
                config: config_r,
                via,
            });
        }
        Ok(lora_alpha)
    }

    /// The base weight: `<module>.weight`, with or without the wrapper's next prefix, or
    /// the other half of tied embeddings when the checkpoint stores only one.
    fn base_weight(&self, path: &str, fa: &Factor) -> Result<TensorInfo, PlanError> {
        let weight_name = format!("{path}.weight");
        match find_base(self.base, &weight_name) {
            Ok(t) => Ok(t.clone()),
            Err(tried) => {
                let tied_other = (names::is_head_name(&weight_name)
                    || names::is_embedding_name(&weight_name))
                .then(|| self.tied_group.first())
                .flatten();
                match tied_other.and_then(|n| self.base.get(n)) {
                    Some((_, t)) => Ok(t.clone()),
                    None => Err(PlanError::NoBase {
                        tensor: fa.key.clone(),
                        tried: quote_list(&tried),
                    }),
                }
            }
        }
    }

    /// How the base weight lies relative to the factors: Linear, Conv1D or Embedding.
    fn orientation(
        &self,
        path: &str,
        embedding: bool,
        (fa, fb): (&Factor, &Factor),
        base_t: &TensorInfo,
    ) -> Result<Orientation, PlanError> {
        let (rows, cols) = (base_t.shape[0], base_t.shape[1]);
        if embedding {
            // A [r, vocab], B [dim, r]; the embedding is [vocab, dim].
            if (rows, cols) != (fa.shape[1], fb.shape[0]) {
                return Err(mismatch(fa, base_t, format!(
                    "does not fit lora_embedding_A {:?} and lora_embedding_B {:?} (expected [{}, {}])",
                    fa.shape, fb.shape, fa.shape[1], fb.shape[0]
                )));
            }
            return Ok(Orientation::Embedding);
        }
        let (out, inp) = (fb.shape[0], fa.shape[1]);
        let leaf = path.rsplit('.').next().unwrap_or(path);
        let conv1d_arch = match &self.facts.model_type {
            Some(t) => CONV1D_MODEL_TYPES.contains(&t.as_str()),
            None => CONV1D_LEAVES.contains(&leaf),
        };
        if (rows, cols) == (out, inp) && (out != inp || !conv1d_arch) {
            Ok(Orientation::Linear)
        } else if (rows, cols) == (inp, out) {
            Ok(Orientation::Conv1D)
        } else {
            Err(mismatch(fa, base_t, format!(
                "does not fit lora_A {:?} and lora_B {:?} (expected [{out}, {inp}], or [{inp}, {out}] for a Conv1D layer)",
                fa.shape, fb.shape
            )))
        }
    }

    /// DoRA's magnitude vector, one per output feature (`out_units`), when there is one.
    fn magnitude(
        &self,
        parts: &Parts,
        (path, listed): (&str, &str),
        embedding: bool,
        out_units: u64,
    ) -> Result<Option<Factor>, PlanError> {
        match parts.get(&Part::Magnitude) {
            Some((loc, t)) => {
                if embedding {
                    return Err(PlanError::DoraEmbedding {
                        tensor: t.name.clone(),
                    });
                }
                let m = factor(self.adapter, *loc, t, 1)?;
                if m.shape[0] != out_units {
                    return Err(PlanError::Shape {
                        tensor: m.key.clone(),
                        shape: m.shape.clone(),
                        expected: format!("[{out_units}] (one magnitude per output feature)"),
                    });
                }
                Ok(Some(m))
            }
            None if self.config.use_dora => Err(PlanError::MissingFactor {
                module: path.to_string(),
                found: listed.to_string(),
                missing: "lora_magnitude_vector (the config says use_dora)",
            }),
            None => Ok(None),
        }
    }

    /// lora_B.bias and the base bias it moves, when there is one.
    fn lora_bias(
        &self,
        parts: &Parts,
        fb: &Factor,
        base_t: &TensorInfo,
    ) -> Result<(Option<Factor>, Option<String>), PlanError> {
        let Some((loc, t)) = parts.get(&Part::BBias) else {
            return Ok((None, None));
        };
        let f = factor(self.adapter, *loc, t, 1)?;
        if f.shape[0] != fb.shape[0] {
            return Err(PlanError::Shape {
                tensor: f.key.clone(),
                shape: f.shape.clone(),
                expected: format!("[{}]", fb.shape[0]),
            });
        }
        let bias_name = match base_t.name.strip_suffix(".weight") {
            Some(stem) => format!("{stem}.bias"),
            None => format!("{}.bias", base_t.name),
        };
        match self.base.get(&bias_name) {
            Some((_, bt))
                if bt.shape == f.shape && matches!(bt.dtype.class(), DtypeClass::Float(_)) => {}
            _ => {
                return Err(PlanError::NoBaseBias {
                    tensor: f.key.clone(),
                    base: bias_name,
                })
            }
        }
        Ok((Some(f), Some(bias_name)))
    }

    /// The base tensors that receive ΔW: the base weight, or every stored copy of a tied
    /// matrix (each one a float tensor of the same shape).
    fn targets(&self, fa: &Factor, base_t: &TensorInfo) -> Result<Vec<String>, PlanError> {
        if !(self.tied && self.tied_group.contains(&base_t.name)) {
            return Ok(vec![base_t.name.clone()]);
        }
        let targets = self.tied_group.clone();
        for other in &targets {
            if let Some((_, t)) = self.base.get(other) {
                if t.shape != base_t.shape || !matches!(t.dtype.class(), DtypeClass::Float(_)) {
                    return Err(mismatch(fa, t, format!(
                        "is tied to `{}` {:?} (tie_word_embeddings) but is not a float tensor of that shape",
                        base_t.name, base_t.shape
                    )));
                }
            }
        }
        Ok(targets)
    }

    /// Records that module `path` changes `tensors`; fails if another one already does.
    fn claim<'t>(
        &mut self,
        path: &str,
        tensors: impl Iterator<Item = &'t String>,
    ) -> Result<(), PlanError> {
        for t in tensors {
            if let Some(first) = self.owner.insert(t.clone(), path.to_string()) {
                return Err(PlanError::Twice {
                    base: t.clone(),
                    first,
                    second: path.to_string(),
                    why: if self.tied {
                        " (tie_word_embeddings shares one matrix between the embedding and the head)"
                    } else {
                        ""
                    },
                });
            }
        }
        Ok(())
    }

    /// The base tensor of full tensor `t` (named `name` in the wrapped model): checked and
    /// claimed; `None` when it has none and `--skip` matches it.
    fn full_base(
        &mut self,
        t: &TensorInfo,
        name: &str,
        skipped: &dyn Fn(&str) -> bool,
    ) -> Result<Option<String>, PlanError> {
        let bt = match find_base(self.base, name) {
            Ok(bt) => bt,
            Err(_) if skipped(name) => return Ok(None),
            Err(tried) => {
                return Err(PlanError::FullWithoutBase {
                    tensor: t.name.clone(),
                    tried: quote_list(&tried),
                    suggest: format!("^{}$", regex::escape(name)),
                })
            }
        };
        if bt.shape != t.shape {
            return Err(PlanError::BaseMismatch {
                tensor: t.name.clone(),
                base: bt.name.clone(),
                dtype: bt.dtype.name().to_string(),
                shape: bt.shape.clone(),
                problem: format!("does not have the adapter tensor's shape {:?}", t.shape),
            });
        }
        if let Some(first) = self.owner.insert(bt.name.clone(), t.name.clone()) {
            return Err(PlanError::Twice {
                base: bt.name.clone(),
                first,
                second: t.name.clone(),
                why: "",
            });
        }
        if matches!(bt.dtype.class(), DtypeClass::Float(_)) {
            float_of(t)?;
        }
        Ok(Some(bt.name.clone()))
    }
}

/// Decodes float elements to f64, exactly.
#[inline(always)]
pub fn decode_into(dtype: FloatDtype, bytes: &[u8], out: &mut [f64]) {
    match dtype {
        FloatDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = convert::bf16_to_f64(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        FloatDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = convert::f16_to_f64(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        FloatDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
            }
        }
        FloatDtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *o = f64::from_le_bytes(b);
            }
        }
    }
}

/// Decodes a whole tensor to f64.
pub fn decode(dtype: FloatDtype, bytes: &[u8]) -> Vec<f64> {
    let mut out = vec![0.0; bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut out);
    out
}

/// Rounds f64 values once to `dtype` (to nearest even), little-endian.
#[inline(always)]
pub fn encode_into(dtype: FloatDtype, values: &[f64], out: &mut [u8]) {
    match dtype {
        FloatDtype::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&convert::f64_to_bf16(*v).to_le_bytes());
            }
        }
        FloatDtype::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&convert::f64_to_f16(*v).to_le_bytes());
            }
        }
        FloatDtype::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&convert::f64_to_f32(*v).to_le_bytes());
            }
        }
        FloatDtype::F64 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Transposes a row-major [n, m] matrix.
fn transpose(x: &[f64], n: usize, m: usize) -> Vec<f64> {
    let mut t = vec![0.0; x.len()];
    for i in 0..n {
        for j in 0..m {
            t[j * n + i] = x[i * m + j];
        }
    }
    t
}

/// A module's factors in f64, in the base tensor's storage orientation.
#[derive(Debug, Clone)]
pub struct Factors {
    pub rank: usize,
    pub rows: usize,
    pub cols: usize,
    /// [r, rows]
    pub left: Vec<f64>,
    /// [r, cols]
    pub right: Vec<f64>,
    pub scaling: f64,
}

impl Factors {
    /// Builds the factors from the adapter tensors' bytes.
    pub fn new(m: &Module, a: &[u8], b: &[u8]) -> Factors {
        let r = m.rank as usize;
        let a = decode(m.a.dtype, a);
        let b = decode(m.b.dtype, b);
        let (b0, b1) = (m.b.shape[0] as usize, m.b.shape[1] as usize);
        let bt = transpose(&b, b0, b1); // [r, out] (or [r, dim])
        let (left, right) = match m.orientation {
            Orientation::Linear => (bt, a),
            Orientation::Conv1D | Orientation::Embedding => (a, bt),
        };
        Factors {
            rank: r,
            rows: m.rows as usize,
            cols: m.cols as usize,
            left,
            right,
            scaling: m.scaling,
        }
    }

    /// Σₖ left[k, row]·right[k, col] for every col, k in order (not yet scaled).
    #[inline]
    pub fn row(&self, row: usize, acc: &mut [f64]) {
        acc.fill(0.0);
        for k in 0..self.rank {
            let l = self.left[k * self.rows + row];
            let right = &self.right[k * self.cols..(k + 1) * self.cols];
            for (a, &x) in acc.iter_mut().zip(right) {
                *a += l * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_the_product_in_storage_orientation() {
        // B [3, 2], A [2, 4]: ΔW = B·A [3, 4].
        let b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let a = [1.0, 0.5, 0.25, 2.0, -1.0, 3.0, 0.0, 1.0];
        let mut factors = Factors {
            rank: 2,
            rows: 3,
            cols: 4,
            left: transpose(&b, 3, 2),
            right: a.to_vec(),
            scaling: 1.0,
        };
        let mut acc = vec![0.0; 4];
        factors.row(1, &mut acc);
        assert_eq!(acc, vec![3.0 - 4.0, 1.5 + 12.0, 0.75, 6.0 + 4.0]);
        // Conv1D: storage [4, 3] = (B·A)ᵀ.
        factors = Factors {
            rank: 2,
            rows: 4,
            cols: 3,
            left: a.to_vec(),
            right: transpose(&b, 3, 2),
            scaling: 1.0,
        };
        let mut acc = vec![0.0; 3];
        factors.row(1, &mut acc);
        assert_eq!(acc, vec![0.5 + 6.0, 1.5 + 12.0, 2.5 + 18.0]);
    }
}
