//! The provenance record `expo.json` and the model card README.md made from it.

use std::fs;
use std::path::Path;

use serde::Serialize;

use super::{card, CardMetadata};
use crate::checkpoint::Checkpoint;
use crate::hub::ResolvedInput;
use crate::text::shell_join;

/// One input as recorded in the provenance.
#[derive(Debug, Clone, Serialize)]
pub struct InputRecord {
    /// The path as the user gave it.
    pub given: String,
    /// The resolved, absolute path.
    pub path: String,
    /// The weight files read, relative to `path`'s directory.
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: u64,
    /// The Hub id (`org/name`), when the input came from the Hugging Face cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
    /// The revision asked for (`main` unless `@REV` was given), for a Hub input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The commit of the cached snapshot read, for a Hub input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

impl InputRecord {
    /// Describes a checkpoint whose argument was resolved (possibly from the Hugging Face
    /// cache): `given` is what the user typed, `path` the local directory read.
    pub fn resolved(ck: &Checkpoint, input: &ResolvedInput) -> InputRecord {
        let mut record = Self::at(ck, &input.path);
        record.given = input.given.display().to_string();
        if let Some(hub) = &input.hub {
            record.hub_id = Some(hub.repo_id.clone());
            record.revision = Some(hub.revision.clone());
            record.commit = Some(hub.commit.clone());
        }
        record
    }

    fn at(ck: &Checkpoint, path: &Path) -> InputRecord {
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        InputRecord {
            given: ck.given.display().to_string(),
            path: canonical.display().to_string(),
            files: ck.weight_file_names(),
            tensors: ck.len(),
            bytes: ck.data_bytes(),
            hub_id: None,
            revision: None,
            commit: None,
        }
    }

    /// How the model card names this input: the path as given, or for a Hub input the id
    /// with the revision and the commit it resolved to.
    pub fn describe(&self) -> String {
        match (&self.hub_id, &self.revision, &self.commit) {
            (Some(id), Some(rev), Some(commit)) if rev == commit => {
                format!("`{id}` at commit `{commit}`")
            }
            (Some(id), Some(rev), Some(commit)) => {
                format!("`{id}` at `{rev}` (commit `{commit}`)")
            }
            _ => format!("`{}`", self.given),
        }
    }
}

/// See [`Provenance::base_models`].
fn base_model_ids(sft: &InputRecord, aligned: &InputRecord, card: &CardMetadata) -> Vec<String> {
    let mut ids: Vec<String> = match &sft.hub_id {
        Some(id) => vec![id.clone()],
        None => card.base_models.clone(),
    };
    ids.extend(aligned.hub_id.clone());
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| card::is_hub_id(id) && seen.insert(id.clone()));
    ids
}

/// Tensor counts by treatment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TensorCounts {
    pub total: usize,
    pub extrapolated: usize,
    /// Converted to another float format only (alpha 0 with --dtype).
    pub cast: usize,
    pub copied: usize,
}

/// The `expo.json` provenance record. Deterministic: no timestamps, no host names.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub tool: &'static str,
    pub version: &'static str,
    pub method: &'static str,
    pub formula: &'static str,
    pub arithmetic: &'static str,
    pub paper: &'static str,
    pub alpha: f64,
    /// Per-module rules, in priority order, with what they matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRecord>,
    pub dtype: String,
    pub max_shard_size: Option<u64>,
    /// Whole-model ‖θ1 − θ0‖ / ‖θ0‖ over the extrapolated tensors.
    pub relative_change: Option<f64>,
    pub sft: InputRecord,
    pub aligned: InputRecord,
    pub tensors: TensorCounts,
    /// Bytes of tensor data written.
    pub tensor_bytes: u64,
    pub shards: Vec<String>,
    pub side_files: Vec<String>,
    pub command: Vec<String>,
}

/// A per-module rule as recorded in the provenance and the model card.
#[derive(Debug, Clone, Serialize)]
pub struct RuleRecord {
    /// The rule as written on the command line.
    pub rule: String,
    /// The α it gave in this output.
    pub alpha: f64,
    /// How many tensors it matched.
    pub tensors: usize,
}

/// The paper this method comes from.
pub const PAPER_URL: &str = "https://arxiv.org/abs/2404.16792";
/// The formula, in ASCII.
pub const FORMULA: &str = "theta2 = theta1 + alpha * (theta1 - theta0)";

impl Provenance {
    /// Serializes the record as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("provenance always serializes");
        v.push(b'\n');
        v
    }

    /// The Hugging Face ids for the model card's `base_model`: θ0's Hub id, or, when θ0 is
    /// a local path, the ids θ1's own card lists as its `base_model` (θ1 was trained from
    /// θ0, so that is where θ0 came from); then θ1's Hub id. Local paths never appear
    /// there (the Hub would read `/abs/path` as an invalid id and `org/name` as an unrelated
    /// repo); the card's body and `expo.json` name them.
    pub fn base_models(&self, theta1_card: &CardMetadata) -> Vec<String> {
        base_model_ids(&self.sft, &self.aligned, theta1_card)
    }

    /// The model card: YAML front matter for the Hub (`base_model` ids, θ1's card metadata
    /// that still applies), then how the model was made.
    pub fn model_card(&self, theta1_card: &CardMetadata) -> String {
        let mut card = String::new();
        card.push_str("---\n");
        let ids = self.base_models(theta1_card);
        card.push_str(&card_base_models(&ids));
        // A merge lists what was merged; with fewer than two known ids the Hub infers.
        if ids.len() >= 2 {
            card.push_str("base_model_relation: merge\n");
        }
        card.push_str(&theta1_card.yaml());
        card.push_str(&card_tags(&[]));
        card.push_str("# Model extrapolation (ExPO)\n\n");
        card.push_str(
            "This model was made without training, by extrapolating from a supervised \
             fine-tuned checkpoint θ0 through an aligned (DPO/RLHF) checkpoint θ1:\n\n",
        );
        card.push_str(&format!(
            "    θ2 = θ1 + α·(θ1 − θ0),   α = {}\n\n",
            self.alpha
        ));
        if !self.rules.is_empty() {
            card.push_str("Per-module α (the first matching rule sets a tensor's α):\n\n");
            for r in &self.rules {
                card.push_str(&format!(
                    "- `{}`: α = {} for {} tensor{}\n",
                    r.rule,
                    r.alpha,
                    r.tensors,
                    if r.tensors == 1 { "" } else { "s" }
                ));
            }
            card.push('\n');
        }
        card.push_str("| | checkpoint |\n|---|---|\n");
        card.push_str(&format!("| θ0 (SFT) | {} |\n", self.sft.describe()));
        card.push_str(&format!(
            "| θ1 (aligned) | {} |\n\n",
            self.aligned.describe()
        ));
        card.push_str(&format!(
            "{} of {} tensors were extrapolated: each element computed in float64 \
             (subtract, multiply, add) and rounded once to the output dtype, to nearest even. \
             {} tensors were copied unchanged from θ1{}. The configuration, tokenizer and \
             generation settings are θ1's{}.\n\n",
            self.tensors.extrapolated,
            self.tensors.total,
            self.tensors.copied,
            if self.tensors.cast > 0 {
                format!(" and {} converted to another dtype", self.tensors.cast)
            } else {
                String::new()
            },
            if self.dtype == "auto" {
                ""
            } else {
                " (where config.json names a dtype, it names the output's)"
            }
        ));
        card.push_str(&card_footer(self.version, &self.command, self.paper));
        card
    }
}

/// The tool every `expo.json` names.
pub const TOOL: &str = "expo";
/// Its version, as every `expo.json` and model card records it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `base_model:` list of a model card's front matter (nothing when `ids` is empty):
/// Hub ids only, each quoted as a JSON string.
pub fn card_base_models(ids: &[String]) -> String {
    let mut s = String::new();
    if !ids.is_empty() {
        s.push_str("base_model:\n");
        for id in ids {
            s.push_str(&format!("- {}\n", serde_json::Value::String(id.clone())));
        }
    }
    s
}

/// The end of every model card's front matter: expo's tags, then `extra` ones, the closing
/// `---` and a blank line.
pub fn card_tags(extra: &[&str]) -> String {
    let mut s = String::from("tags:\n- expo\n- model-extrapolation\n");
    for tag in extra {
        s.push_str(&format!("- {tag}\n"));
    }
    s.push_str("---\n\n");
    s
}

/// The end of every model card: the expo `version` and the `command` that made it, and the
/// method's `paper`.
pub fn card_footer(version: &str, command: &[String], paper: &str) -> String {
    format!(
        "Made with expo {version}:\n\n```sh\n{}\n```\n\n\
         Method: Zheng et al., *Model Extrapolation Expedites Alignment* ({paper}). \
         `expo.json` records the exact inputs and settings.\n",
        shell_join(command)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(given: &str, hub_id: Option<&str>) -> InputRecord {
        InputRecord {
            given: given.into(),
            path: given.into(),
            files: Vec::new(),
            tensors: 0,
            bytes: 0,
            hub_id: hub_id.map(String::from),
            revision: None,
            commit: None,
        }
    }

    #[test]
    fn base_model_holds_hub_ids_only() {
        let card = CardMetadata {
            base_models: vec!["org/sft".into(), "org/older".into()],
            ..CardMetadata::default()
        };
        let none = CardMetadata::default();
        let local_sft = record("/data/sft", None);
        let local_dpo = record("dpo", None);
        let hub_sft = record("org/sft", Some("org/sft"));
        let hub_dpo = record("org/dpo", Some("org/dpo"));
        // θ0's Hub id wins over θ1's card; θ1's id last; duplicates once.
        assert_eq!(
            base_model_ids(&hub_sft, &hub_dpo, &card),
            ["org/sft", "org/dpo"]
        );
        assert_eq!(
            base_model_ids(&local_sft, &hub_dpo, &card),
            ["org/sft", "org/older", "org/dpo"]
        );
        assert_eq!(
            base_model_ids(&local_sft, &local_dpo, &card),
            ["org/sft", "org/older"]
        );
        assert_eq!(base_model_ids(&hub_sft, &local_dpo, &none), ["org/sft"]);
        assert!(base_model_ids(&local_sft, &local_dpo, &none).is_empty());
    }
}
