//! The output plan ([`OutputPlan`]) of an adapter run (the adapter-over-base front-end of
//! the one writer): every output tensor with its recipe, laid out in shards — the adapter's one file for
//! `--as adapter`, --sft's files for `--as model` — plus the index and the name whose α
//! each tensor takes. The shards and the index are built by [`crate::plan`]'s shared
//! builders, and written by [`crate::writer`] through [`super::source::LoraSource`].

use std::collections::HashMap;

use crate::checkpoint::{Checkpoint, Layout, TensorLoc};
use crate::dtype::{Dtype, DtypeClass, FloatDtype};
use crate::header::encode_header;
use crate::plan::{index_bytes, lay_out_shard, Input, OutTensor, OutputPlan, Recipe, ShardPlan};

use super::config::WEIGHTS_NAME;
use super::lora::{AdapterPlan, Role};
use super::names::Part;

fn float(d: Dtype) -> Option<FloatDtype> {
    match d.class() {
        DtypeClass::Float(f) => Some(f),
        _ => None,
    }
}

impl OutputPlan {
    /// `--as model`: mirrors `base`; adapter tensors with no θ0 go at the end of the last
    /// file.
    pub fn model(base: &Checkpoint, adapter: &Checkpoint, plan: &AdapterPlan) -> OutputPlan {
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
                            from: Input::Sft,
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
        OutputPlan {
            tensors,
            shards,
            index,
        }
    }

    /// `--as adapter`: the adapter's one file, its tensors in place, B factors scaled and
    /// full tensors extrapolated against the base.
    pub fn adapter(adapter: &Checkpoint, plan: &AdapterPlan, base: &Checkpoint) -> OutputPlan {
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
        OutputPlan {
            tensors,
            shards,
            index: None,
        }
    }

    /// Counts: (changed by the adapter, copied from --sft, added from the adapter).
    pub fn adapter_counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for t in &self.tensors {
            match t.recipe {
                Recipe::Copy {
                    from: Input::Sft, ..
                } => c.1 += 1,
                Recipe::Copy {
                    from: Input::Aligned,
                    ..
                } => c.2 += 1,
                _ => c.0 += 1,
            }
        }
        c
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
                    rows: m.rows,
                    cols: m.cols,
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
                from: Input::Sft,
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
                from: Input::Aligned,
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
        from: Input::Aligned,
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
