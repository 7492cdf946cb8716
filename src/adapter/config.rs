//! `adapter_config.json`: the fields of a PEFT LoRA config that change what the adapter
//! means, and the refusals for adapters that cannot be extrapolated against θ0.
//!
//! The file is untrusted: it is read with a size cap, fields are checked one by one, and
//! `rank_pattern` / `alpha_pattern` keep their document order (PEFT takes the first key
//! that matches, so order matters).

use std::path::Path;

use serde_json::Value;

use crate::header::Entries;

/// Name of the config file in an adapter directory.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// Name of the weight file in an adapter directory.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// Largest config accepted, in bytes.
pub const MAX_CONFIG_LEN: u64 = 16 << 20;
/// Largest rank accepted (PEFT has no limit; this guards allocations on untrusted input).
pub const MAX_RANK: u64 = 1 << 16;

/// `init_lora_weights` values whose adapters are relative to a modified base.
const BASE_MODIFYING_INITS: [&str; 6] = ["pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga"];

/// What is wrong with an adapter config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: reading it failed: {cause}")]
    Io {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is larger than {limit} bytes; not an adapter config")]
    TooLarge {
        path: std::path::PathBuf,
        limit: u64,
    },
    #[error("{path} is not valid JSON: {reason}")]
    Json {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{CONFIG_NAME}: field `{field}` {problem}")]
    Field { field: String, problem: String },
    #[error("{CONFIG_NAME}: {what}; {why}")]
    Unsupported { what: String, why: String },
}

fn field(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// A regex key of `rank_pattern` / `alpha_pattern`, compiled the way PEFT matches it.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// The key as written in the config.
    pub key: String,
    regex: regex::Regex,
    pub value: f64,
}

impl Pattern {
    /// PEFT's rule (`get_pattern_key`, PEFT ≥ 0.14): the key matches a module path when
    /// `re.match(rf"(.*\.)?({key})$", path)` does, i.e. the key matches a dot-aligned
    /// suffix of the path in full.
    pub fn matches(&self, module_path: &str) -> bool {
        self.regex.is_match(module_path)
    }
}

/// The parts of a LoRA config expo uses.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    /// Ordered as in the file; the first key that matches wins.
    pub rank_pattern: Vec<Pattern>,
    pub alpha_pattern: Vec<Pattern>,
    /// What the config says (not used to decide the orientation; see the module docs).
    pub fan_in_fan_out: bool,
    /// `target_modules` as a display string (a list or a regex).
    pub target_modules: Option<String>,
    /// `modules_to_save` as written (not reliable: tensors are classified by their names).
    pub modules_to_save: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub init_lora_weights: String,
}

impl AdapterConfig {
    /// Reads and validates `dir/adapter_config.json`.
    pub fn read(path: &Path) -> Result<AdapterConfig, ConfigError> {
        let io = |cause| ConfigError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let file = crate::header::open_regular(path)
            .map_err(io)?
            .ok_or_else(|| {
                io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file",
                ))
            })?;
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                limit: MAX_CONFIG_LEN,
            });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG_LEN), &mut text)
            .map_err(io)?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Json { reason, .. } => ConfigError::Json {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Parses the text of a config.
    pub fn parse(text: &str) -> Result<AdapterConfig, ConfigError> {
        let doc = Doc::read(text)?;
        check_peft_type(&doc)?;
        let r = match doc.present("r") {
            Some(v) => v
                .as_u64()
                .filter(|&r| (1..=MAX_RANK).contains(&r))
                .ok_or_else(|| {
                    field(
                        "r",
                        format!("must be a rank from 1 to {MAX_RANK}, found {v}"),
                    )
                })?,
            None => 8, // PEFT's default
        };
        let lora_alpha = match doc.present("lora_alpha") {
            Some(v) => v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
                field("lora_alpha", format!("must be a finite number, found {v}"))
            })?,
            None => 8.0, // PEFT's default
        };
        let use_rslora = doc.flag("use_rslora")?;
        let use_dora = doc.flag("use_dora")?;
        let lora_bias = doc.flag("lora_bias")?;
        let fan_in_fan_out = doc.flag("fan_in_fan_out")?;
        let init_lora_weights = init_lora_weights(&doc)?;
        refuse_unsupported(&doc)?;
        let rank_pattern = patterns(doc.raw_of("rank_pattern"), "rank_pattern", true)?;
        let alpha_pattern = patterns(doc.raw_of("alpha_pattern"), "alpha_pattern", false)?;
        let target_modules = doc.present("target_modules").map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        });
        let modules_to_save = match doc.present("modules_to_save") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let base_model_name_or_path = doc
            .present("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora,
            use_dora,
            lora_bias,
            rank_pattern,
            alpha_pattern,
            fan_in_fan_out,
            target_modules,
            modules_to_save,
            base_model_name_or_path,
            init_lora_weights,
        })
    }

    /// The rank and lora_alpha of the module at `path` (relative to the model, without
    /// `base_model.model.`), after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> (u64, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|p| p.matches(path))
            .map_or(self.r, |p| p.value as u64);
        let a = self
            .alpha_pattern
            .iter()
            .find(|p| p.matches(path))
            .map_or(self.lora_alpha, |p| p.value);
        (r, a)
    }

    /// The scaling s of a module with rank `r` and `lora_alpha` a: a/r, or a/√r with
    /// `use_rslora`.
    pub fn scaling(&self, r: u64, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Whether the config has per-module patterns (vLLM ignores them).
    pub fn has_patterns(&self) -> bool {
        !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty()
    }
}

/// adapter_config.json's top-level entries, raw (nested objects keep their document order)
/// and parsed.
struct Doc {
    raw: Entries<Box<serde_json::value::RawValue>>,
    values: Vec<(String, Value)>,
}

impl Doc {
    fn read(text: &str) -> Result<Doc, ConfigError> {
        let json_err = |e: serde_json::Error| ConfigError::Json {
            path: CONFIG_NAME.into(),
            reason: e.to_string(),
        };
        // Raw values first: nested objects must keep their document order.
        let raw: Entries<Box<serde_json::value::RawValue>> =
            serde_json::from_str(text).map_err(json_err)?;
        let mut values = Vec::with_capacity(raw.0.len());
        for (k, v) in &raw.0 {
            values.push((
                k.clone(),
                serde_json::from_str::<Value>(v.get()).map_err(json_err)?,
            ));
        }
        Ok(Doc { raw, values })
    }

    /// The value of `name`, unless absent or null.
    fn present(&self, name: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    /// The text of `name`'s value as written, unless absent or null.
    fn raw_of(&self, name: &str) -> Option<&str> {
        self.raw
            .0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.get())
            .filter(|_| self.present(name).is_some())
    }

    /// A true/false field; absent is false.
    fn flag(&self, name: &str) -> Result<bool, ConfigError> {
        match self.present(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(field(name, format!("must be true or false, found {v}"))),
        }
    }
}

/// Only LoRA adapters are read.
fn check_peft_type(doc: &Doc) -> Result<(), ConfigError> {
    match doc.present("peft_type") {
        Some(t) if t.as_str() != Some("LORA") => Err(ConfigError::Unsupported {
            what: format!("peft_type is {t}"),
            why: "expo reads LoRA adapters only (peft_type \"LORA\")".into(),
        }),
        _ => Ok(()),
    }
}

/// `init_lora_weights` as a string; refused when the initialisation changed the base.
fn init_lora_weights(doc: &Doc) -> Result<String, ConfigError> {
    let init_lora_weights = match doc.present("init_lora_weights") {
        None => "true".to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(field(
                "init_lora_weights",
                format!("must be true, false or a method name, found {v}"),
            ))
        }
    };
    let lower = init_lora_weights.to_ascii_lowercase();
    if let Some(method) = BASE_MODIFYING_INITS.iter().find(|m| lower.starts_with(*m)) {
        return Err(ConfigError::Unsupported {
            what: format!("init_lora_weights is \"{init_lora_weights}\""),
            why: format!(
                "{method} initialisation changes the base weights, so this adapter is relative to a modified base, not to --sft; convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion when saving)"
            ),
        });
    }
    Ok(init_lora_weights)
}

/// Refuses the LoRA variants whose update is not a weight delta over one θ0 per module.
fn refuse_unsupported(doc: &Doc) -> Result<(), ConfigError> {
    if let Some(v) = doc.present("layer_replication") {
        return Err(ConfigError::Unsupported {
            what: format!("layer_replication is {v}"),
            why: "replicated layers share base weights, so the adapter has no one θ0 per module"
                .into(),
        });
    }
    if let Some(v) = doc.present("alora_invocation_tokens") {
        return Err(ConfigError::Unsupported {
            what: format!("alora_invocation_tokens is {v} (an aLoRA adapter)"),
            why: "an activated LoRA applies only after its invocation tokens, so it is not a weight delta to extrapolate".into(),
        });
    }
    if let Some(v) = doc.present("target_parameters") {
        if v.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(ConfigError::Unsupported {
                what: format!("target_parameters is {v}"),
                why: "LoRA on raw parameters (e.g. MoE experts) is not supported".into(),
            });
        }
    }
    if let Some(v) = doc.present("use_qalora") {
        if v.as_bool() == Some(true) {
            return Err(ConfigError::Unsupported {
                what: "use_qalora is true".into(),
                why: "QA-LoRA pools the input, so B·A is not the weight delta".into(),
            });
        }
    }
    Ok(())
}

fn patterns(raw: Option<&str>, name: &str, integer: bool) -> Result<Vec<Pattern>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    // Read in document order (serde_json's maps sort their keys).
    let entries: Entries<Value> = serde_json::from_str(raw).map_err(|_| {
        field(
            name,
            format!("must be an object of regex → number, found {}", raw.trim()),
        )
    })?;
    let mut out = Vec::with_capacity(entries.0.len());
    for (key, value) in entries.0 {
        let number = if integer {
            value
                .as_u64()
                .filter(|&r| (1..=MAX_RANK).contains(&r))
                .map(|r| r as f64)
        } else {
            value.as_f64().filter(|a| a.is_finite())
        };
        let number = number.ok_or_else(|| {
            field(
                &format!("{name}.{key}"),
                format!(
                    "must be {}, found {value}",
                    if integer {
                        "a rank from 1"
                    } else {
                        "a finite number"
                    }
                ),
            )
        })?;
        let regex = regex::RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                field(
                    &format!("{name}.{key}"),
                    format!("is not a valid regular expression: {e}"),
                )
            })?;
        out.push(Pattern {
            key,
            regex,
            value: number,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_dot_aligned_suffixes_and_the_first_key_wins() {
        let c = AdapterConfig::parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,
                "rank_pattern":{"q_proj":4,"layers.0.self_attn.q_proj":2},
                "alpha_pattern":{"^model.layers.1\\..*v_proj":3}}"#,
        )
        .unwrap();
        // `q_proj` comes first, so it wins even where the longer key also matches.
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj"),
            (4, 16.0)
        );
        // Not dot-aligned: `xq_proj` does not match `q_proj`.
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.xq_proj"),
            (8, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.v_proj"),
            (8, 3.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.2.self_attn.v_proj"),
            (8, 16.0)
        );
        assert_eq!(c.scaling(8, 16.0), 2.0);
    }

    #[test]
    fn rslora_scales_by_the_square_root() {
        let c = AdapterConfig::parse(r#"{"r":16,"lora_alpha":8,"use_rslora":true}"#).unwrap();
        assert_eq!(c.scaling(16, 8.0), 2.0);
    }

    #[test]
    fn refusals_name_the_field() {
        for (text, needle) in [
            (
                r#"{"init_lora_weights":"pissa_niter_4"}"#,
                "init_lora_weights",
            ),
            (r#"{"init_lora_weights":"olora"}"#, "olora"),
            (r#"{"init_lora_weights":"corda"}"#, "corda"),
            (r#"{"init_lora_weights":"loftq"}"#, "loftq"),
            (r#"{"init_lora_weights":"lora_ga"}"#, "lora_ga"),
            (r#"{"layer_replication":[[0,2]]}"#, "layer_replication"),
            (r#"{"alora_invocation_tokens":[1,2]}"#, "aLoRA"),
            (
                r#"{"target_parameters":["experts.w1"]}"#,
                "target_parameters",
            ),
            (r#"{"peft_type":"IA3"}"#, "peft_type"),
            (r#"{"r":0}"#, "`r`"),
            (r#"{"lora_alpha":"x"}"#, "lora_alpha"),
            (r#"{"rank_pattern":{"(":2}}"#, "rank_pattern.("),
        ] {
            let e = AdapterConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        // Harmless values pass.
        AdapterConfig::parse(
            r#"{"init_lora_weights":"gaussian","layer_replication":null,"target_parameters":[],"alora_invocation_tokens":null}"#,
        )
        .unwrap();
    }
}
