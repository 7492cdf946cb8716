//! θ1's model card metadata: a strict reader for the YAML front matter of a Hugging Face
//! `README.md`, limited to what expo carries over.
//!
//! Hub cards hold a YAML front matter between `---` lines. expo needs a handful of top-level
//! keys from it, each a scalar or a list of scalars, so instead of a YAML library it reads a
//! small, strict subset: `key: scalar`, `key: [a, b]`, and `key:` followed by `- item` lines.
//! Scalars may be plain, `"double-quoted"` (JSON escapes) or `'single-quoted'`. Anything
//! else (nested maps, multi-line strings, anchors, tags, flow maps) is dropped for that key,
//! never guessed at: a key is either carried over exactly or not at all.

/// The card metadata keys carried over from θ1 (they still hold for the extrapolated model).
pub const KEPT_KEYS: [&str; 7] = [
    "library_name",
    "pipeline_tag",
    "license",
    "license_name",
    "license_link",
    "language",
    "datasets",
];

/// Read at most this much of θ1's card: the front matter comes first, and is small.
pub const MAX_CARD_BYTES: u64 = 1 << 20;

/// A value of the subset read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Scalar(String),
    List(Vec<String>),
}

impl Value {
    fn items(&self) -> Vec<&str> {
        match self {
            Value::Scalar(s) => vec![s.as_str()],
            Value::List(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// What expo takes from θ1's model card.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardMetadata {
    /// The kept keys found, in [`KEPT_KEYS`] order.
    pub kept: Vec<(String, Value)>,
    /// θ1's `base_model` entries that are valid Hugging Face ids.
    pub base_models: Vec<String>,
}

impl CardMetadata {
    /// Reads the metadata from the text of a model card; a card without front matter, or
    /// with keys of other shapes, simply gives less.
    pub fn parse(text: &str) -> CardMetadata {
        let entries = front_matter(text).map(parse_entries).unwrap_or_default();
        let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let kept = KEPT_KEYS
            .iter()
            .filter_map(|&k| get(k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let base_models = get("base_model")
            .map(|v| {
                v.items()
                    .into_iter()
                    .filter(|s| is_hub_id(s))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        CardMetadata { kept, base_models }
    }

    /// The kept keys as YAML lines (each ending in a newline).
    pub fn yaml(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.kept {
            match value {
                Value::Scalar(s) => out.push_str(&format!("{key}: {}\n", yaml_scalar(s))),
                Value::List(items) => {
                    out.push_str(&format!("{key}:\n"));
                    for item in items {
                        out.push_str(&format!("- {}\n", yaml_scalar(item)));
                    }
                }
            }
        }
        out
    }
}

pub use crate::hub::is_hub_id;

/// A scalar written back as YAML: plain when that reads back as the same string, else
/// double-quoted (a JSON string is a valid YAML double-quoted scalar).
pub fn yaml_scalar(s: &str) -> String {
    let reserved = [
        "true", "false", "yes", "no", "on", "off", "null", "y", "n", "~",
    ];
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !reserved.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

/// The text between the opening `---` line and the closing `---` (or `...`) line.
fn front_matter(text: &str) -> Option<&str> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next()?;
    if first.trim_end() != "---" {
        return None;
    }
    let start = first.len();
    let mut pos = start;
    for line in lines {
        let t = line.trim_end();
        if t == "---" || t == "..." {
            return Some(&text[start..pos]);
        }
        pos += line.len();
    }
    None
}

/// Top-level `key: value` entries of the subset; keys of other shapes are left out.
fn parse_entries(front: &str) -> Vec<(String, Value)> {
    let lines: Vec<&str> = front.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut out: Vec<(String, Value)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        // A top-level key starts at column 0; anything else here belongs to a dropped key.
        if line.starts_with([' ', '\t', '-']) {
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let key_ok = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        // The lines that belong to this key: indented ones, and `- ` items at column 0.
        let mut body = Vec::new();
        while i < lines.len() {
            let l = lines[i];
            let belongs = l.trim().is_empty()
                || l.starts_with([' ', '\t'])
                || l == "-"
                || l.starts_with("- ");
            if !belongs {
                break;
            }
            body.push(l);
            i += 1;
        }
        if !key_ok {
            continue;
        }
        let rest = strip_comment(rest).trim();
        let value = if rest.is_empty() {
            block_list(&body)
        } else if body.iter().all(|l| l.trim().is_empty()) {
            inline_value(rest)
        } else {
            None // a scalar continued on further lines: a shape expo does not read
        };
        if let Some(v) = value {
            // A key given twice: YAML would reject the document; take neither.
            if let Some(pos) = out.iter().position(|(k, _)| k == key) {
                out.remove(pos);
                continue;
            }
            out.push((key.to_string(), v));
        }
    }
    out
}

/// `- item` lines (all at one indentation) as a list of scalars.
fn block_list(body: &[&str]) -> Option<Value> {
    let items: Vec<&str> = body
        .iter()
        .copied()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect();
    if items.is_empty() {
        return None; // `key:` with nothing: null
    }
    let indent = items[0].len() - items[0].trim_start().len();
    let mut out = Vec::new();
    for l in items {
        let t = l.trim_start();
        if l.len() - t.len() != indent {
            return None;
        }
        let item = t.strip_prefix("- ").or_else(|| (t == "-").then_some(""))?;
        out.push(scalar(strip_comment(item).trim())?);
    }
    Some(Value::List(out))
}

/// A value on the key's own line: a flow list `[a, b]` or a scalar.
fn inline_value(rest: &str) -> Option<Value> {
    if let Some(inner) = rest.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        if inner.trim().is_empty() {
            return Some(Value::List(Vec::new()));
        }
        let mut items = Vec::new();
        for part in split_flow(inner)? {
            items.push(scalar(part.trim())?);
        }
        return Some(Value::List(items));
    }
    scalar(rest).map(Value::Scalar)
}

/// Splits a flow list's inside on commas outside quotes; `None` for nested collections.
fn split_flow(inner: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in inner.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '[' | ']' | '{' | '}' => return None,
                ',' => {
                    parts.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    if quote.is_some() {
        return None;
    }
    parts.push(&inner[start..]);
    Some(parts)
}

/// One scalar of the subset, unquoted; `None` for the shapes expo does not read.
fn scalar(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    if s.starts_with('"') {
        // YAML's double-quoted escapes are a superset of JSON's; what JSON cannot read is
        // dropped rather than guessed.
        return serde_json::from_str::<String>(s).ok();
    }
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner.strip_suffix('\'')?;
        if inner.replace("''", "").contains('\'') {
            return None;
        }
        return Some(inner.replace("''", "'"));
    }
    let special = [
        '[', ']', '{', '}', '&', '*', '!', '|', '>', '%', '@', '`', '#', ',', '?', ':',
    ];
    if s.starts_with(special) || s.starts_with("- ") || s.contains(": ") || s.contains(" #") {
        return None;
    }
    Some(s.to_string())
}

/// Removes a ` # comment` outside quotes.
fn strip_comment(s: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => {
                if c == '#' && prev_space {
                    return &s[..i];
                }
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
        }
        prev_space = c == ' ' || c == '\t';
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_of(card: &CardMetadata, key: &str) -> Option<Value> {
        card.kept
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn reads_scalars_lists_and_quotes() {
        let text = "---\nlicense: other\nlicense_name: \"my license\"\nlicense_link: 'https://x.org/l?a=1'\n\
                    language:\n- en\n- 'no'\ndatasets: [HuggingFaceH4/ultrafeedback_binarized, \"a, b\"]\n\
                    pipeline_tag: text-generation # a comment\nlibrary_name: transformers\n\
                    base_model: HuggingFaceH4/mistral-7b-sft-beta\ntags:\n- x\n---\n# Card\n";
        let card = CardMetadata::parse(text);
        assert_eq!(
            scalar_of(&card, "license"),
            Some(Value::Scalar("other".into()))
        );
        assert_eq!(
            scalar_of(&card, "license_name"),
            Some(Value::Scalar("my license".into()))
        );
        assert_eq!(
            scalar_of(&card, "license_link"),
            Some(Value::Scalar("https://x.org/l?a=1".into()))
        );
        assert_eq!(
            scalar_of(&card, "language"),
            Some(Value::List(vec!["en".into(), "no".into()]))
        );
        assert_eq!(
            scalar_of(&card, "datasets"),
            Some(Value::List(vec![
                "HuggingFaceH4/ultrafeedback_binarized".into(),
                "a, b".into()
            ]))
        );
        assert_eq!(
            scalar_of(&card, "pipeline_tag"),
            Some(Value::Scalar("text-generation".into()))
        );
        assert_eq!(card.base_models, vec!["HuggingFaceH4/mistral-7b-sft-beta"]);
        // Written back in KEPT_KEYS order; `no` stays a string, the URL is quoted.
        assert_eq!(
            card.yaml(),
            "library_name: transformers\npipeline_tag: text-generation\nlicense: other\n\
             license_name: \"my license\"\nlicense_link: \"https://x.org/l?a=1\"\nlanguage:\n- en\n\
             - \"no\"\ndatasets:\n- HuggingFaceH4/ultrafeedback_binarized\n- \"a, b\"\n"
        );
    }

    #[test]
    fn unknown_shapes_are_dropped_not_mangled() {
        let text = "---\nlicense: |\n  multi\n  line\nlanguage:\n  en: yes\ndatasets: {a: b}\n\
                    library_name: &anchor x\npipeline_tag: a\n  continued\n\
                    base_model:\n- /abs/path\n- ./rel\n- org/name\n- a/b/c\n---\n";
        let card = CardMetadata::parse(text);
        assert_eq!(card.kept, vec![]);
        assert_eq!(card.base_models, vec!["org/name"]);
    }

    #[test]
    fn no_front_matter_gives_nothing() {
        assert_eq!(
            CardMetadata::parse("# Title\nlicense: mit\n"),
            CardMetadata::default()
        );
        assert_eq!(
            CardMetadata::parse("---\nlicense: mit\n"),
            CardMetadata::default()
        );
        // A key given twice is ambiguous: dropped.
        let card = CardMetadata::parse("---\nlicense: mit\nlicense: apache-2.0\n---\n");
        assert_eq!(card.kept, vec![]);
    }

    #[test]
    fn yaml_scalars_read_back() {
        assert_eq!(yaml_scalar("apache-2.0"), "apache-2.0");
        assert_eq!(yaml_scalar("yes"), "\"yes\"");
        assert_eq!(yaml_scalar("1.0"), "\"1.0\"");
        assert_eq!(yaml_scalar("a: b"), "\"a: b\"");
    }
}
