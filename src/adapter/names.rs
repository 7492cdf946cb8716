//! Tensor names in a PEFT adapter file, and the base tensors they belong to.
//!
//! PEFT saves `base_model.model.<module path>.lora_A.weight` and friends (the adapter name
//! removed). Tensors are classified by their key names only: the config's
//! `modules_to_save` is not a reliable list.

/// The prefix PEFT's wrapper adds to every key.
pub const WRAPPER_PREFIX: &str = "base_model.model.";

/// What one key of an adapter file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `…lora_A.weight` [r, in].
    A,
    /// `…lora_B.weight` [out, r].
    B,
    /// `…lora_B.bias` [out] (`lora_bias: true`).
    BBias,
    /// `…lora_embedding_A` [r, vocab].
    EmbA,
    /// `…lora_embedding_B` [dim, r].
    EmbB,
    /// `…lora_magnitude_vector` [out] (DoRA).
    Magnitude,
}

impl Part {
    /// True for the factors that `--as adapter` multiplies by (1+α).
    pub fn scales(self) -> bool {
        matches!(self, Part::B | Part::BBias | Part::EmbB)
    }
}

/// A classified key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A LoRA tensor of the module at `module` (path without the wrapper prefix).
    Lora { module: String, part: Part },
    /// A full tensor (modules_to_save, a trained bias, a head), named without the prefix.
    Full { name: String },
}

/// Why a key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("tensor `{tensor}` is a copy of a base module ({what}), written by an old PEFT version; such a file mixes base weights into the adapter: re-save the adapter with a current PEFT")]
    BaseCopy { tensor: String, what: &'static str },
    #[error("tensor `{tensor}` looks like a LoRA tensor but is not one of lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B or lora_magnitude_vector (a LoRA variant expo does not read?)")]
    UnknownLora { tensor: String },
}

/// Classifies one key of an adapter file.
pub fn classify(key: &str) -> Result<Key, KeyError> {
    let stripped = key.strip_prefix(WRAPPER_PREFIX).unwrap_or(key);
    for (marker, what) in [
        (".original_module.", "original_module"),
        (".base_layer.", "base_layer"),
    ] {
        if format!(".{stripped}").contains(marker) {
            return Err(KeyError::BaseCopy {
                tensor: key.to_string(),
                what,
            });
        }
    }
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_B.bias", Part::BBias),
        (".lora_embedding_A", Part::EmbA),
        (".lora_embedding_B", Part::EmbB),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_magnitude_vector.weight", Part::Magnitude),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(module) = stripped.strip_suffix(suffix) {
            if !module.is_empty() {
                return Ok(Key::Lora {
                    module: module.to_string(),
                    part,
                });
            }
        }
    }
    if stripped.split('.').any(|c| c.starts_with("lora_")) {
        return Err(KeyError::UnknownLora {
            tensor: key.to_string(),
        });
    }
    Ok(Key::Full {
        name: stripped.to_string(),
    })
}

/// The names a base checkpoint may use for `name` (a path relative to the wrapped model):
/// as is, then without its first component (GPT-2 files hold `h.0…`, the model
/// `transformer.h.0…`).
pub fn base_candidates(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    if let Some((_, rest)) = name.split_once('.') {
        if !rest.is_empty() {
            out.push(rest.to_string());
        }
    }
    out
}

/// Names of input embeddings in common architectures.
pub fn is_embedding_name(name: &str) -> bool {
    [
        "embed_tokens.weight",
        "wte.weight",
        "word_embeddings.weight",
        "embed_in.weight",
    ]
    .iter()
    .any(|s| name == *s || name.ends_with(&format!(".{s}")))
}

/// Names of output heads that transformers ties to the input embedding.
pub fn is_head_name(name: &str) -> bool {
    ["lm_head.weight", "embed_out.weight"]
        .iter()
        .any(|s| name == *s || name.ends_with(&format!(".{s}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified_by_name() {
        let lora = |m: &str, part| Key::Lora {
            module: m.to_string(),
            part,
        };
        assert_eq!(
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Ok(lora("model.layers.0.self_attn.q_proj", Part::A))
        );
        assert_eq!(
            classify("base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"),
            Ok(lora("transformer.h.0.attn.c_attn", Part::BBias))
        );
        assert_eq!(
            classify("base_model.model.model.embed_tokens.lora_embedding_B"),
            Ok(lora("model.embed_tokens", Part::EmbB))
        );
        assert_eq!(
            classify("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"),
            Ok(lora("model.layers.0.mlp.up_proj", Part::Magnitude))
        );
        assert_eq!(
            classify("base_model.model.score.weight"),
            Ok(Key::Full {
                name: "score.weight".into()
            })
        );
        assert!(matches!(
            classify("base_model.model.lm_head.original_module.weight"),
            Err(KeyError::BaseCopy { .. })
        ));
        assert!(matches!(
            classify("base_model.model.model.layers.0.q_proj.base_layer.weight"),
            Err(KeyError::BaseCopy { .. })
        ));
        assert!(matches!(
            classify("base_model.model.model.layers.0.q_proj.lora_A.default.weight"),
            Err(KeyError::UnknownLora { .. })
        ));
    }

    #[test]
    fn base_names_are_tried_with_and_without_the_wrapper_component() {
        assert_eq!(
            base_candidates("transformer.h.0.attn.c_attn.weight"),
            vec![
                "transformer.h.0.attn.c_attn.weight",
                "h.0.attn.c_attn.weight"
            ]
        );
        assert!(is_embedding_name("model.embed_tokens.weight"));
        assert!(is_embedding_name("wte.weight"));
        assert!(is_head_name("lm_head.weight"));
        assert!(!is_head_name("lm_head.bias"));
    }
}
