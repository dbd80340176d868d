//! Tokenizers built from a GGUF file's own metadata, matching llama.cpp token for token (a
//! Hugging Face tokenizer.json is first translated into those keys: [`hf`]).
//!
//! Two vocabularies are supported, as llama.cpp names them in `tokenizer.ggml.model`:
//! `gpt2` (byte-level BPE with a pre-tokenizer chosen by `tokenizer.ggml.pre`) and `llama`
//! (SentencePiece-style: merges by score, `▁` for spaces, byte fallback).
//! Text is first split on special tokens (control and user-defined ones), then each plain
//! fragment is tokenized on its own.

mod bpe;
pub mod chat;
pub mod hf;
mod pretokenize;
mod spm;

use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;

pub use chat::{ChatTemplate, Message};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata has no '{0}'; the file carries no usable tokenizer")]
    Missing(&'static str),
    #[error("GGUF metadata '{key}' has the wrong type: {detail}")]
    BadMetadata { key: &'static str, detail: String },
    #[error("unsupported tokenizer model '{0}' (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported BPE pre-tokenizer '{0}' (supported: {supported})", supported = pretokenize::SUPPORTED.join(", "))]
    UnsupportedPre(String),
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    BadId { id: u32, n_vocab: usize },
    #[error("Hugging Face tokenizer: {0}")]
    HfTokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i32) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
    /// Tokens that are matched literally in text before the vocabulary model runs.
    fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }
}

#[derive(Debug, Clone)]
enum Model {
    Bpe(Box<bpe::Bpe>),
    Spm(Box<spm::Spm>),
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    model: Model,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    token_to_id: HashMap<String, u32>,
    /// Special tokens, longest first, so that a longer token wins over its prefix.
    specials: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    add_space_prefix: bool,
    end_of_generation: Vec<u32>,
}

/// Texts of tokens that end generation in the formats llama.cpp knows (end of turn, end of
/// text, fill-in-the-middle separators). As llama.cpp does, such a token is treated as a
/// control token even when the file says otherwise, which also changes how text containing it
/// is tokenized.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

fn get<'a>(md: &'a HashMap<String, Value>, key: &'static str) -> Result<&'a Value> {
    md.get(key).ok_or(TokenizerError::Missing(key))
}

fn bad(key: &'static str) -> impl Fn(candle_core::Error) -> TokenizerError {
    move |e| TokenizerError::BadMetadata {
        key,
        detail: e.to_string(),
    }
}

fn opt_u32(md: &HashMap<String, Value>, key: &'static str) -> Result<Option<u32>> {
    md.get(key)
        .map(|v| v.to_u32().map_err(bad(key)))
        .transpose()
}

fn opt_bool(md: &HashMap<String, Value>, key: &'static str) -> Result<Option<bool>> {
    md.get(key)
        .map(|v| v.to_bool().map_err(bad(key)))
        .transpose()
}

fn string_array(md: &HashMap<String, Value>, key: &'static str) -> Result<Vec<String>> {
    get(md, key)?
        .to_vec()
        .map_err(bad(key))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(bad(key)))
        .collect()
}

impl Tokenizer {
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let kind = get(md, "tokenizer.ggml.model")?
            .to_string()
            .map_err(bad("tokenizer.ggml.model"))?
            .clone();
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let mut types: Vec<TokenType> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(bad("tokenizer.ggml.token_type"))?
                .iter()
                .map(|t| {
                    t.to_i32()
                        .map(TokenType::from_gguf)
                        .map_err(bad("tokenizer.ggml.token_type"))
                })
                .collect::<Result<_>>()?,
            None => vec![TokenType::Normal; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.token_type",
                detail: format!("{} types for {} tokens", types.len(), tokens.len()),
            });
        }
        let token_to_id: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bos = opt_u32(md, "tokenizer.ggml.bos_token_id")?;
        let eos = opt_u32(md, "tokenizer.ggml.eos_token_id")?;
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for text in END_OF_GENERATION_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                types[id as usize] = TokenType::Control;
                if !end_of_generation.contains(&id) {
                    end_of_generation.push(id);
                }
            }
        }
        let model = match kind.as_str() {
            "gpt2" => {
                let pre = md
                    .get("tokenizer.ggml.pre")
                    .map(|v| v.to_string().cloned().map_err(bad("tokenizer.ggml.pre")))
                    .transpose()?
                    .unwrap_or_else(|| "default".to_string());
                let merges = string_array(md, "tokenizer.ggml.merges")?;
                Model::Bpe(Box::new(bpe::Bpe::new(
                    &tokens,
                    &token_to_id,
                    &merges,
                    &pre,
                )?))
            }
            "llama" => {
                let scores = match md.get("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()
                        .map_err(bad("tokenizer.ggml.scores"))?
                        .iter()
                        .map(|s| s.to_f32().map_err(bad("tokenizer.ggml.scores")))
                        .collect::<Result<Vec<f32>>>()?,
                    None => vec![0.0; tokens.len()],
                };
                Model::Spm(Box::new(spm::Spm::new(&tokens, &types, scores)))
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let is_spm = matches!(model, Model::Spm(_));
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| types[i as usize].is_special() && !tokens[i as usize].is_empty())
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        Ok(Self {
            model,
            types,
            specials,
            bos,
            eos,
            // llama.cpp's defaults when the file says nothing: SPM adds BOS, BPE does not.
            add_bos: opt_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(is_spm),
            add_eos: opt_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: opt_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(is_spm),
            end_of_generation,
            token_to_id,
            tokens,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Tokens that end generation: EOS and the end-of-turn tokens of known formats.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the file asks; `parse_special` lets
    /// control tokens written in the text (`<|im_start|>`) become their ids, as chat templates
    /// need. User-defined tokens are always matched, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        for fragment in self.split_special(text, parse_special) {
            match fragment {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match &self.model {
                        Model::Bpe(bpe) => bpe.encode(t, &mut out),
                        Model::Spm(spm) => {
                            let prefix = if self.add_space_prefix && prev_special {
                                " "
                            } else {
                                ""
                            };
                            spm.encode(&format!("{prefix}{t}"), &mut out)
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    fn split_special<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = vec![Fragment::Text(text)];
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && ty != TokenType::UserDefined {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Special(id));
                    rest = &rest[at + needle.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The bytes a token stands for. Control tokens give their text only when `special` is set;
    /// unused tokens give nothing.
    pub fn token_bytes(&self, id: u32, special: bool) -> Result<Vec<u8>> {
        let idx = id as usize;
        let text = self.tokens.get(idx).ok_or(TokenizerError::BadId {
            id,
            n_vocab: self.tokens.len(),
        })?;
        Ok(match self.types[idx] {
            TokenType::Unused => Vec::new(),
            TokenType::Control | TokenType::Unknown if !special => Vec::new(),
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                text.as_bytes().to_vec()
            }
            TokenType::Normal | TokenType::Byte => match &self.model {
                Model::Bpe(_) => bpe::decode_token(text),
                Model::Spm(_) => spm::decode_token(text, self.types[idx]),
            },
        })
    }

    /// Detokenizes ids into text (invalid UTF-8 is replaced). Control tokens are dropped unless
    /// `special` is set.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id, special)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The token's text as stored in the vocabulary (byte-level or `▁` encoded).
    pub fn piece(&self, id: u32) -> Result<&str> {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .ok_or(TokenizerError::BadId {
                id,
                n_vocab: self.tokens.len(),
            })
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

/// Turns a stream of token bytes into text, holding back an incomplete UTF-8 sequence until
/// the token that completes it arrives (multi-byte characters often span tokens).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return text;
            }
        };
        let text = String::from_utf8(self.pending[..valid].to_vec()).expect("checked valid");
        self.pending.drain(..valid);
        text
    }

    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_holds_back_split_characters() {
        let mut d = StreamDecoder::default();
        let bytes = "天安门".as_bytes();
        assert_eq!(d.push(&bytes[..2]), "");
        assert_eq!(d.push(&bytes[2..4]), "天");
        assert_eq!(d.push(&bytes[4..]), "安门");
        assert_eq!(d.finish(), "");
    }
}
