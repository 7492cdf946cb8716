//! The output plan of an adapter run (the adapter-over-base front-end of the one writer):
//! every output tensor with its recipe, laid out in shards — the adapter's one file for
//! `--as adapter`, --sft's files for `--as model` — plus the index and the name whose α
//! each tensor takes. The shards and the index are built by [`crate::plan`]'s shared
//! builders, and written by [`crate::writer`] through [`super::source::LoraSource`].

use std::collections::HashMap;

use crate::checkpoint::{Checkpoint, Layout, TensorLoc};
use crate::dtype::{Dtype, DtypeClass, FloatDtype};
use crate::header::encode_header;
use crate::plan::{index_bytes, lay_out_shard, ShardPlan};
use crate::writer::{cut_tasks, Task, CHUNK_ELEMENTS, COPY_CHUNK_BYTES};

use super::config::WEIGHTS_NAME;
use super::lora::{AdapterPlan, Role};
use super::names::Part;

/// Which input a stored tensor is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// --sft, θ0.
    Base,
    /// The adapter at --aligned.
    Adapter,
}

/// How one output tensor is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// Stored bytes, copied (θ0's, or an adapter tensor's).
    Copy { from: Input, loc: TensorLoc },
    /// θ0 + (1+α)·ΔW of module `module` (or DoRA's (1+α)·W1 − α·W0), in row blocks.
    LoraRows { module: usize, base: TensorLoc },
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

/// One tensor of the output.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub len: u64,
    pub recipe: Recipe,
    /// The name `--skip`/`--alpha-for` match for this tensor's α; `None`: α is 0.
    pub alpha_name: Option<String>,
}

/// The output's files and tensors, the same for every α.
#[derive(Debug, Clone)]
pub struct AdapterLayout {
    pub tensors: Vec<OutTensor>,
    pub shards: Vec<ShardPlan>,
    pub index: Option<(String, Vec<u8>)>,
}

fn float(d: Dtype) -> Option<FloatDtype> {
    match d.class() {
        DtypeClass::Float(f) => Some(f),
        _ => None,
    }
}

impl AdapterLayout {
    /// `--as model`: mirrors `base`; adapter tensors with no θ0 go at the end of the last
    /// file.
    pub fn model(base: &Checkpoint, adapter: &Checkpoint, plan: &AdapterPlan) -> AdapterLayout {
        let recipes = model_recipes(base, adapter, plan);
        let mut tensors = Vec::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for shard in &base.shards {
            let mut g = Vec::new();
            for (idx, t) in shard.header.tensors.iter().enumerate() {
                let loc = base.get(&t.name).map(|(l, _)| l).unwrap_or(TensorLoc {
                    shard: 0,
                    index: idx,
                });
                g.push(tensors.len());
                tensors.push(OutTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    len: t.len(),
                    recipe: recipes
                        .get(t.name.as_str())
                        .copied()
                        .unwrap_or(Recipe::Copy {
                            from: Input::Base,
                            loc,
                        }),
                    alpha_name: Some(t.name.clone()),
                });
            }
            groups.push(g);
        }
        append_extras(adapter, plan, &mut tensors, &mut groups);
        let shards: Vec<ShardPlan> = base
            .shards
            .iter()
            .zip(groups)
            .map(|(s, g)| {
                lay_out_shard(s.name.clone(), s.header.metadata.as_ref(), g, |i| {
                    let t = &tensors[i];
                    (t.name.as_str(), t.dtype, t.shape.as_slice(), t.len)
                })
            })
            .collect();
        let index = match &base.layout {
            Layout::Indexed {
                index_name,
                metadata,
            } => {
                let bytes = index_bytes(metadata.clone(), &shards, |i| &tensors[i].name);
                Some((index_name.clone(), bytes))
            }
            Layout::Single => None,
        };
        AdapterLayout {
            tensors,
            shards,
            index,
        }
    }

    /// `--as adapter`: the adapter's one file, its tensors in place, B factors scaled and
    /// full tensors extrapolated against the base.
    pub fn adapter(adapter: &Checkpoint, plan: &AdapterPlan, base: &Checkpoint) -> AdapterLayout {
        let shard = &adapter.shards[0];
        let tensors: Vec<OutTensor> = adapter
            .tensors()
            .map(|(loc, t)| {
                let role = plan.roles.get(&t.name).copied();
                OutTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    len: t.len(),
                    recipe: adapter_recipe(role, loc, t.dtype, plan, base),
                    alpha_name: role.map(|r| adapter_alpha_name(r, plan)),
                }
            })
            .collect();
        // The header as read (same offsets), the data written in order after it.
        let entries: Vec<_> = shard
            .header
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.start, t.end))
            .collect();
        let header = encode_header(shard.header.metadata.as_ref(), &entries);
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut cursor = 0;
        for t in &tensors {
            offsets.push(cursor);
            cursor += t.len;
        }
        let shards = vec![ShardPlan {
            file_name: WEIGHTS_NAME.to_string(),
            tensors: (0..tensors.len()).collect(),
            offsets,
            header,
            data_len: cursor,
        }];
        AdapterLayout {
            tensors,
            shards,
            index: None,
        }
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_len).sum()
    }

    /// Counts: (changed by the adapter, copied from --sft, added from the adapter).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for t in &self.tensors {
            match t.recipe {
                Recipe::Copy {
                    from: Input::Base, ..
                } => c.1 += 1,
                Recipe::Copy {
                    from: Input::Adapter,
                    ..
                } => c.2 += 1,
                _ => c.0 += 1,
            }
        }
        c
    }

    /// Each tensor's α in the output whose rules give `alpha_of`.
    pub fn alphas(&self, alpha_of: &dyn Fn(&str) -> f64) -> Vec<f64> {
        self.tensors
            .iter()
            .map(|t| t.alpha_name.as_deref().map_or(0.0, alpha_of))
            .collect()
    }

    /// The work in file order: weights by whole register blocks of rows, float tensors by
    /// elements, copies by bytes. A task of `outputs` outputs keeps one buffer for each, so
    /// computed tasks are `outputs` times smaller: a worker's buffers stay the size of one
    /// output's chunk. (Each row's arithmetic is the same whatever rows share its task.)
    pub fn tasks(&self, plan: &AdapterPlan, outputs: usize) -> Vec<Task> {
        let chunk = (CHUNK_ELEMENTS / outputs.max(1) as u64).max(1);
        cut_tasks(&self.shards, |i| {
            let t = &self.tensors[i];
            let elem = t.dtype.bits() / 8;
            match t.recipe {
                Recipe::LoraRows { module, .. } => {
                    let cols = plan.modules[module].cols.max(1);
                    let rows = plan.modules[module].rows;
                    // Whole register blocks of rows per task (see rows.rs).
                    let step = (chunk / cols).max(1);
                    let step = if step >= 8 { step / 8 * 8 } else { step };
                    (rows, step, cols * elem)
                }
                Recipe::LoraBias { .. } | Recipe::AdapterFull { .. } | Recipe::ScaledB { .. } => {
                    (t.shape.iter().product(), chunk, elem)
                }
                Recipe::Copy { .. } => (t.len, COPY_CHUNK_BYTES, 1),
            }
        })
    }
}

/// The recipe of each base tensor the adapter changes, by name.
fn model_recipes<'p>(
    base: &Checkpoint,
    adapter: &Checkpoint,
    plan: &'p AdapterPlan,
) -> HashMap<&'p str, Recipe> {
    let mut recipes: HashMap<&str, Recipe> = HashMap::new();
    for (i, m) in plan.modules.iter().enumerate() {
        for t in &m.targets {
            if let Some((loc, _)) = base.get(t) {
                let recipe = Recipe::LoraRows {
                    module: i,
                    base: loc,
                };
                recipes.insert(t, recipe);
            }
        }
        if let Some(b) = m.base_bias.as_deref() {
            if let Some((loc, _)) = base.get(b) {
                recipes.insert(
                    b,
                    Recipe::LoraBias {
                        module: i,
                        base: loc,
                    },
                );
            }
        }
    }
    for (i, f) in plan.full.iter().enumerate() {
        // A full tensor over a non-float base tensor (or a non-float full tensor) keeps
        // θ0's bytes.
        let Some((loc, t0)) = f.base.as_deref().and_then(|b| base.get(b)) else {
            continue;
        };
        let t1 = &adapter.shards[f.loc.shard].header.tensors[f.loc.index];
        let recipe = match (float(t0.dtype), float(t1.dtype)) {
            (Some(_), Some(_)) => Recipe::AdapterFull {
                full: i,
                base: loc,
                zero_copies: false,
            },
            (Some(_), None) => Recipe::Copy {
                from: Input::Base,
                loc,
            },
            (None, _) => continue,
        };
        recipes.insert(f.base.as_deref().unwrap_or_default(), recipe);
    }
    recipes
}

/// Adds the adapter's full tensors that have no θ0 (matched by --skip) at the end of the
/// last file, copied.
fn append_extras(
    adapter: &Checkpoint,
    plan: &AdapterPlan,
    tensors: &mut Vec<OutTensor>,
    groups: &mut [Vec<usize>],
) {
    for f in plan.full.iter().filter(|f| f.base.is_none()) {
        let t = &adapter.shards[f.loc.shard].header.tensors[f.loc.index];
        if let Some(g) = groups.last_mut() {
            g.push(tensors.len());
        }
        tensors.push(OutTensor {
            name: f.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            len: t.len(),
            recipe: Recipe::Copy {
                from: Input::Adapter,
                loc: f.loc,
            },
            alpha_name: Some(f.name.clone()),
        });
    }
}

/// How `--as adapter` makes the adapter tensor at `loc` with `role`.
fn adapter_recipe(
    role: Option<Role>,
    loc: TensorLoc,
    dtype: Dtype,
    plan: &AdapterPlan,
    base: &Checkpoint,
) -> Recipe {
    let copy = Recipe::Copy {
        from: Input::Adapter,
        loc,
    };
    match (role, float(dtype)) {
        (Some(Role::Lora { part, .. }), Some(_)) if part.scales() => Recipe::ScaledB { loc },
        (Some(Role::Full(i)), Some(_)) => {
            let f = &plan.full[i];
            match f.base.as_deref().and_then(|n| base.get(n)) {
                Some((bloc, bt)) if float(bt.dtype).is_some() => Recipe::AdapterFull {
                    full: i,
                    base: bloc,
                    zero_copies: true,
                },
                _ => copy,
            }
        }
        _ => copy,
    }
}

/// The name whose α an adapter tensor takes: for a LoRA factor, the base tensor it moves;
/// for a full tensor, its base (or its own name).
fn adapter_alpha_name(role: Role, plan: &AdapterPlan) -> String {
    match role {
        Role::Lora { module, part } => {
            let m = &plan.modules[module];
            match part {
                Part::BBias => m.base_bias.as_deref().unwrap_or(&m.targets[0]).to_string(),
                _ => m.targets[0].clone(),
            }
        }
        Role::Full(i) => {
            let f = &plan.full[i];
            f.base.as_deref().unwrap_or(&f.name).to_string()
        }
    }
}
