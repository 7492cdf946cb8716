//! `config.json` with `--dtype`: the dtype it names is set to the output's, and nothing else
//! in the file changes.
//!
//! transformers' `from_pretrained(..., torch_dtype="auto")` (and vLLM's `--dtype auto`) load
//! the weights in the dtype `config.json` names, so a config still saying `bfloat16` for an
//! f32 output rounds the weights again on load. expo edits the JSON text at the value's
//! span, never re-serializing, so that key order, spacing and number spellings stay θ1's.
//!
//! Edited: the string value of `torch_dtype` and of `dtype` (transformers' newer name) at the
//! top level, and in the top-level sub-configs of composite models (`text_config`,
//! `vision_config`, … any object-valued key ending in `_config`, except
//! `quantization_config`, whose dtypes describe compute, not storage). Those sub-configs
//! describe parts of the same weights, which `--dtype` converts as well, so leaving their old
//! value would make the file contradict the weights it comes with. A `null` or absent dtype is
//! left alone (transformers then takes the weights' own dtype).

use crate::dtype::FloatDtype;

/// The keys that name the weights' dtype.
const DTYPE_KEYS: [&str; 2] = ["torch_dtype", "dtype"];

/// The name transformers uses for a dtype.
pub fn torch_name(d: FloatDtype) -> &'static str {
    match d {
        FloatDtype::BF16 => "bfloat16",
        FloatDtype::F16 => "float16",
        FloatDtype::F32 => "float32",
        FloatDtype::F64 => "float64",
    }
}

/// Why a config could not be edited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigEditError {
    #[error("it is not valid JSON ({reason})")]
    NotJson { reason: String },
    #[error("it is not a JSON object")]
    NotAnObject,
}

/// One edit: the byte range of a value in the text, and the key path (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub path: String,
    pub start: usize,
    pub end: usize,
    pub old: String,
}

/// Finds the dtype values to replace in `text` (see the module docs).
pub fn find_dtype_values(text: &[u8]) -> Result<Vec<Edit>, ConfigEditError> {
    let value: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| ConfigEditError::NotJson {
            reason: e.to_string(),
        })?;
    if !value.is_object() {
        return Err(ConfigEditError::NotAnObject);
    }
    // The text is valid JSON from here on, so the scanner below can be simple; it still
    // never indexes out of bounds (a `None` ends the scan).
    let mut s = Scanner { b: text, i: 0 };
    let mut edits = Vec::new();
    s.ws();
    s.object(None, &mut edits)
        .ok_or(ConfigEditError::NotAnObject)?;
    Ok(edits)
}

/// A config with its dtype values replaced, and the edits made.
pub type Edited = (Vec<u8>, Vec<Edit>);

/// `text` with every value of [`find_dtype_values`] set to `d`'s name; `None` when the
/// config names no dtype.
pub fn set_dtype(text: &[u8], d: FloatDtype) -> Result<Option<Edited>, ConfigEditError> {
    let edits = find_dtype_values(text)?;
    if edits.is_empty() {
        return Ok(None);
    }
    let new = format!("\"{}\"", torch_name(d));
    let mut out = Vec::with_capacity(text.len() + 16 * edits.len());
    let mut pos = 0;
    for e in &edits {
        out.extend_from_slice(&text[pos..e.start]);
        out.extend_from_slice(new.as_bytes());
        pos = e.end;
    }
    out.extend_from_slice(&text[pos..]);
    Ok(Some((out, edits)))
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// Skips a string starting at the current `"`; returns its span.
    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return Some((start, self.i));
                }
                _ => self.i += 1,
            }
        }
    }

    /// Skips any value.
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek()?,
                    b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'
                ) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// Scans an object; `parent` is the key of the sub-config it is (`None` at the top).
    fn object(&mut self, parent: Option<&str>, edits: &mut Vec<Edit>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            self.ws();
            let (ks, ke) = self.string()?;
            let key: String = serde_json::from_slice(&self.b[ks..ke]).ok()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            let path = match parent {
                Some(p) => format!("{p}.{key}"),
                None => key.clone(),
            };
            match self.peek()? {
                b'"' if DTYPE_KEYS.contains(&key.as_str()) => {
                    let (start, end) = self.string()?;
                    let old = serde_json::from_slice(&self.b[start..end]).ok()?;
                    edits.push(Edit {
                        path,
                        start,
                        end,
                        old,
                    });
                }
                b'{' if parent.is_none()
                    && key.ends_with("_config")
                    && key != "quantization_config" =>
                {
                    self.object(Some(&key), edits)?;
                }
                _ => self.value()?,
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_dtype_values_change() {
        let text = br#"{
  "architectures": ["LlamaForCausalLM"],
  "rope_scaling": {"factor": 8.0, "dtype": "x"},
  "torch_dtype":   "bfloat16" ,
  "x": 1.50e0,
  "text_config": {"torch_dtype": "bfloat16", "nested": {"dtype": "float16"}},
  "quantization_config": {"dtype": "int8"},
  "s": "torch_dtype \" }",
  "dtype": "bfloat16"
}
"#;
        let (out, edits) = set_dtype(text, FloatDtype::F32).unwrap().unwrap();
        let paths: Vec<&str> = edits.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["torch_dtype", "text_config.torch_dtype", "dtype"]);
        let want = String::from_utf8(text.to_vec())
            .unwrap()
            .replacen(
                "\"torch_dtype\":   \"bfloat16\"",
                "\"torch_dtype\":   \"float32\"",
                1,
            )
            .replacen(
                "{\"torch_dtype\": \"bfloat16\", \"nested\"",
                "{\"torch_dtype\": \"float32\", \"nested\"",
                1,
            )
            .replacen("\"dtype\": \"bfloat16\"", "\"dtype\": \"float32\"", 1);
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }

    #[test]
    fn no_dtype_key_no_edit() {
        assert_eq!(set_dtype(b"{\"a\": 1}", FloatDtype::F16).unwrap(), None);
        assert_eq!(set_dtype(b"{}", FloatDtype::F16).unwrap(), None);
        assert_eq!(
            set_dtype(b"{\"torch_dtype\": null}", FloatDtype::F16).unwrap(),
            None
        );
    }

    #[test]
    fn invalid_json_is_refused() {
        assert!(matches!(
            set_dtype(b"{\"torch_dtype\": \"bf16\"", FloatDtype::F16),
            Err(ConfigEditError::NotJson { .. })
        ));
        assert_eq!(
            set_dtype(b"[1]", FloatDtype::F16),
            Err(ConfigEditError::NotAnObject)
        );
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let (out, _) = set_dtype(b"{\"torch\\u005fdtype\":\"float16\"}", FloatDtype::BF16)
            .unwrap()
            .unwrap();
        assert_eq!(out, b"{\"torch\\u005fdtype\":\"bfloat16\"}");
    }
}
