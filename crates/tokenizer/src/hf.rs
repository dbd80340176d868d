//! A Hugging Face checkpoint's tokenizer (`tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`) translated into the GGUF metadata keys llama.cpp's converter would
//! write, so that one implementation tokenizes both kinds of model. As the converter does,
//! the pre-tokenizer is recognised, not interpreted: its regex must be one of the known ones.
//! Byte-level BPE vocabularies (GPT-2, SmolLM, Qwen2/3, Llama 3) are supported, and
//! SentencePiece-style ones (BPE with byte fallback and `▁` for spaces: Gemma, Llama 2): those
//! merge by score, and a converted SentencePiece vocabulary lists its pieces by falling score,
//! so each piece's score is minus its id.

use crate::{Result, TokenizerError};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;

/// The `Split` regexes of the pre-tokenizers this crate implements, by their llama.cpp name.
const KNOWN_SPLITS: &[(&str, &str)] = &[
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "llama3",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
];

/// The `Split` regex a tokenizer.json of the named pre-tokenizer writes.
pub fn split_regex(pre: &str) -> Option<&'static str> {
    KNOWN_SPLITS
        .iter()
        .find(|(name, _)| *name == pre)
        .map(|(_, regex)| *regex)
}

fn bad(detail: impl Into<String>) -> TokenizerError {
    TokenizerError::HfTokenizer(detail.into())
}

/// GGUF tokenizer metadata from the checkpoint's files: `tokenizer.json` is required, the
/// others are read where present (`chat_template.jinja` wins over the config's template).
pub fn metadata(
    tokenizer_json: &str,
    tokenizer_config: Option<&str>,
    chat_template: Option<&str>,
) -> Result<HashMap<String, Value>> {
    let tok: Json = serde_json::from_str(tokenizer_json)
        .map_err(|e| bad(format!("tokenizer.json is not valid JSON: {e}")))?;
    let config: Json = match tokenizer_config {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| bad(format!("tokenizer_config.json is not valid JSON: {e}")))?,
        None => Json::Null,
    };
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "the vocabulary model is {}; only BPE is read from tokenizer.json: convert this checkpoint to GGUF with llama.cpp's convert_hf_to_gguf.py",
            model["type"]
        )));
    }
    let sentencepiece = model["byte_fallback"].as_bool() == Some(true);
    let (pre, add_space_prefix) = if sentencepiece {
        // Splitting on spaces after they became `▁` splits nothing.
        let pre = &tok["pre_tokenizer"];
        if !pre.is_null() && pre["pattern"]["String"].as_str() != Some(" ") {
            return Err(bad(format!(
                "pre-tokenizer {pre} is not supported beside byte fallback"
            )));
        }
        (None, sentencepiece_normalizer(&tok["normalizer"])?)
    } else {
        // NFC is left out, as llama.cpp leaves it out: chat text is NFC already.
        match tok["normalizer"]["type"].as_str() {
            None | Some("NFC") => {}
            Some(other) => return Err(bad(format!("the {other} normalizer is not supported"))),
        }
        (Some(pre_tokenizer(&tok["pre_tokenizer"])?), false)
    };

    let mut by_id: HashMap<u32, (String, i32)> = HashMap::new();
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object"))?;
    let unk = model["unk_token"].as_str();
    for (text, id) in vocab {
        let id = as_id(id).ok_or_else(|| bad(format!("model.vocab[{text:?}] is not an id")))?;
        let kind = if sentencepiece && is_byte_piece(text) {
            6
        } else if Some(text.as_str()) == unk {
            2
        } else {
            1
        };
        by_id.insert(id, (text.clone(), kind));
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (as_id(&added["id"]), added["content"].as_str()) else {
            return Err(bad(format!("added token {added} has no id or content")));
        };
        // Special tokens are control tokens; the others are user-defined (matched in text).
        let kind = if Some(text) == unk {
            2
        } else if added["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        by_id.insert(id, (text.to_string(), kind));
    }
    let n = by_id.keys().max().map_or(0, |&m| m as usize + 1);
    let (tokens, types): (Vec<Value>, Vec<Value>) = (0..n as u32)
        .map(|id| match by_id.remove(&id) {
            Some((text, kind)) => (Value::String(text), Value::I32(kind)),
            // Ids nothing names, as the converter fills them.
            None => (Value::String(format!("[PAD{id}]")), Value::I32(5)),
        })
        .unzip();
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not a list"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str()) {
                (Some(a), Some(b)) => Ok(Value::String(format!("{a} {b}"))),
                _ => Err(bad(format!("merge {m} is not two strings"))),
            },
            _ => Err(bad(format!("merge {m} is neither \"a b\" nor [a, b]"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let token_id = |key: &str| -> Result<Option<u32>> {
        let text = match &config[key] {
            Json::String(s) => s.as_str(),
            Json::Object(o) => o.get("content").and_then(Json::as_str).unwrap_or(""),
            _ => return Ok(None),
        };
        tokens
            .iter()
            .position(|t| matches!(t, Value::String(s) if s == text))
            .map(|i| Some(i as u32))
            .ok_or_else(|| {
                bad(format!(
                    "tokenizer_config.json's {key} {text:?} is not a token"
                ))
            })
    };
    let mut md: HashMap<String, Value> = HashMap::new();
    match pre {
        Some(pre) => {
            md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
            md.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
            md.insert("tokenizer.ggml.merges".into(), Value::Array(merges));
        }
        None => {
            md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
            let scores = (0..tokens.len())
                .map(|id| Value::F32(-(id as f32)))
                .collect();
            md.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
            md.insert(
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(add_space_prefix),
            );
        }
    }
    md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.clone()));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    if let Some(id) = token_id("bos_token")? {
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(id));
    }
    if let Some(id) = token_id("eos_token")? {
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(id));
    }
    let add_bos = config["add_bos_token"]
        .as_bool()
        .unwrap_or_else(|| post_processor_adds_bos(&tok["post_processor"]));
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos));
    md.insert(
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(config["add_eos_token"].as_bool().unwrap_or(false)),
    );
    let template = match chat_template {
        Some(t) => Some(t.to_string()),
        None => config_template(&config["chat_template"])?,
    };
    if let Some(t) = template {
        md.insert("tokenizer.chat_template".into(), Value::String(t));
    }
    Ok(md)
}

/// `<0x41>`: a byte fallback piece.
fn is_byte_piece(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && u8::from_str_radix(&text[3..5], 16).is_ok()
}

/// A SentencePiece-style normalizer: spaces become `▁`, and a `▁` may be put before the text
/// (`add_space_prefix`, returned).
fn sentencepiece_normalizer(n: &Json) -> Result<bool> {
    let steps: Vec<&Json> = match n["type"].as_str() {
        Some("Sequence") => n["normalizers"].as_array().into_iter().flatten().collect(),
        _ => vec![n],
    };
    let (mut replaces_spaces, mut prepends) = (false, false);
    for step in steps {
        match step["type"].as_str() {
            Some("Replace")
                if step["pattern"]["String"].as_str() == Some(" ")
                    && step["content"].as_str() == Some("\u{2581}") =>
            {
                replaces_spaces = true
            }
            Some("Prepend") if step["prepend"].as_str() == Some("\u{2581}") => prepends = true,
            _ => return Err(bad(format!("normalizer step {step} is not supported"))),
        }
    }
    if !replaces_spaces {
        return Err(bad(
            "a byte-fallback BPE whose normalizer does not turn spaces into ▁ is not supported",
        ));
    }
    Ok(prepends)
}

fn as_id(v: &Json) -> Option<u32> {
    v.as_u64().and_then(|i| u32::try_from(i).ok())
}

/// The llama.cpp name of a byte-level pre-tokenizer.
fn pre_tokenizer(pre: &Json) -> Result<&'static str> {
    let steps: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => vec![pre],
    };
    let mut splits = Vec::new();
    let mut byte_level = false;
    for step in steps {
        match step["type"].as_str() {
            Some("ByteLevel") => {
                if step["add_prefix_space"].as_bool() == Some(true) {
                    return Err(bad(
                        "a ByteLevel pre-tokenizer that adds a prefix space is not supported",
                    ));
                }
                byte_level = true;
                if step["use_regex"].as_bool() != Some(false) {
                    splits.push("gpt2");
                }
            }
            Some("Digits") if step["individual_digits"].as_bool() == Some(true) => {
                splits.push("digits")
            }
            Some("Split") => {
                let regex = step["pattern"]["Regex"].as_str().unwrap_or("");
                let name = KNOWN_SPLITS
                    .iter()
                    .find(|(_, known)| *known == regex)
                    .map(|(name, _)| *name)
                    .ok_or_else(|| {
                        bad(format!(
                            "the pre-tokenizer splits on {} (behaviour {}), which is none of the known ones ({})",
                            step["pattern"],
                            step["behavior"],
                            KNOWN_SPLITS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                        ))
                    })?;
                splits.push(name);
            }
            _ => return Err(bad(format!("pre-tokenizer step {step} is not supported"))),
        }
    }
    if !byte_level {
        return Err(bad(
            "the pre-tokenizer has no ByteLevel step, so this is not a byte-level BPE",
        ));
    }
    match splits.as_slice() {
        ["gpt2"] => Ok("gpt2"),
        ["digits", "gpt2"] => Ok("smollm"),
        ["qwen2"] => Ok("qwen2"),
        ["llama3"] => Ok("llama3"),
        other => Err(bad(format!(
            "the pre-tokenizer sequence {other:?} is not a known one"
        ))),
    }
}

/// Llama 3's post-processor puts BOS before every text; Qwen's adds nothing.
fn post_processor_adds_bos(post: &Json) -> bool {
    let steps: Vec<&Json> = match post["type"].as_str() {
        Some("Sequence") => post["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => vec![post],
    };
    steps.iter().any(|s| {
        s["type"].as_str() == Some("TemplateProcessing")
            && s["single"][0].get("SpecialToken").is_some()
    })
}

/// `chat_template` in tokenizer_config.json: a string, or a list of named templates of which
/// `default` is the chat one.
fn config_template(t: &Json) -> Result<Option<String>> {
    Ok(match t {
        Json::Null => None,
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => named
            .iter()
            .find(|n| n["name"].as_str() == Some("default"))
            .and_then(|n| n["template"].as_str())
            .map(str::to_string),
        other => {
            return Err(bad(format!(
                "chat_template {other} is neither text nor a list"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TokenType, Tokenizer};
    use serde_json::json;

    fn sentencepiece_json() -> String {
        let mut vocab = serde_json::Map::new();
        for (i, piece) in ["<unk>", "<bos>", "<0x41>", "▁", "a", "b", "▁a", "▁ab"]
            .iter()
            .enumerate()
        {
            vocab.insert(piece.to_string(), json!(i));
        }
        json!({
            "added_tokens": [
                {"id": 0, "content": "<unk>", "special": true},
                {"id": 1, "content": "<bos>", "special": true},
            ],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}]},
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>",
                      "vocab": vocab, "merges": [["▁", "a"], ["▁a", "b"]]},
        })
        .to_string()
    }

    #[test]
    fn byte_fallback_vocabularies_become_sentencepiece_scored_by_id() {
        let md = metadata(
            &sentencepiece_json(),
            Some(r#"{"bos_token": "<bos>"}"#),
            None,
        )
        .unwrap();
        assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "llama");
        assert_eq!(
            md["tokenizer.ggml.scores"].to_vec().unwrap()[5]
                .to_f32()
                .unwrap(),
            -5.0
        );
        let t = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(t.types[0], TokenType::Unknown);
        assert_eq!(t.types[2], TokenType::Byte);
        // BOS from the post-processor; " ab b" merges by score, then `▁` and `b` stay apart.
        assert_eq!(t.encode(" ab b", true, true), vec![1, 7, 3, 5]);
        assert_eq!(t.decode(&[7, 2], false).unwrap(), " abA");
    }

    #[test]
    fn what_is_not_implemented_is_refused_with_the_reason() {
        let word_piece = json!({"model": {"type": "WordPiece", "vocab": {}}}).to_string();
        let err = metadata(&word_piece, None, None).unwrap_err().to_string();
        assert!(
            err.contains("WordPiece") && err.contains("convert_hf_to_gguf"),
            "{err}"
        );

        let split = |regex: &str| {
            json!({
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
                    {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
                "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
            })
            .to_string()
        };
        let err = metadata(&split(r"\p{L}+"), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r"\\p{L}+") && err.contains("qwen2, llama3"),
            "{err}"
        );
        let md = metadata(&split(KNOWN_SPLITS[1].1), None, None).unwrap();
        assert_eq!(md["tokenizer.ggml.pre"].to_string().unwrap(), "llama3");

        let bad_eos = metadata(
            &split(KNOWN_SPLITS[0].1),
            Some(r#"{"eos_token": "</s>"}"#),
            None,
        );
        assert!(bad_eos
            .unwrap_err()
            .to_string()
            .contains("\"</s>\" is not a token"));
    }
}
