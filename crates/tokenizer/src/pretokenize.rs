//! Pre-tokenizers for byte-level BPE: regex splits chosen by `tokenizer.ggml.pre`, applied in
//! sequence as llama.cpp does (each regex splits every fragment the previous one produced; the
//! text between matches is kept as fragments of its own).

use crate::{Result, TokenizerError};
use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub const SUPPORTED: &[&str] = &["default", "gpt2", "smollm", "qwen2", "llama3", "llama-bpe"];

fn patterns(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "default" | "gpt2" => &[GPT2],
        // Digits are split one by one before the GPT-2 pattern runs.
        "smollm" => &[r"\p{N}", GPT2],
        "qwen2" => &[QWEN2],
        "llama3" | "llama-bpe" => &[LLAMA3],
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(pre: &str) -> Result<Self> {
        let patterns =
            patterns(pre).ok_or_else(|| TokenizerError::UnsupportedPre(pre.to_string()))?;
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p).expect("built-in pattern compiles"))
            .collect();
        Ok(Self { regexes })
    }

    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut words = vec![text];
        for regex in &self.regexes {
            let mut next = Vec::with_capacity(words.len());
            for word in words {
                let mut last = 0;
                for m in regex.find_iter(word) {
                    // The patterns have no catastrophic backtracking; a failure here can only be
                    // the backtrack limit on pathological input, where keeping the rest whole is safe.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&word[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < word.len() {
                    next.push(&word[last..]);
                }
            }
            words = next;
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_splits_digits_one_by_one() {
        let p = PreTokenizer::new("smollm").unwrap();
        assert_eq!(p.split("abc 123 x"), vec!["abc", " ", "1", "2", "3", " x"]);
    }

    #[test]
    fn qwen2_keeps_newlines_apart_and_letters_with_one_leading_symbol() {
        let p = PreTokenizer::new("qwen2").unwrap();
        assert_eq!(
            p.split("Hello,  world!\n\nI'm 42"),
            vec!["Hello", ",", " ", " world", "!\n\n", "I", "'m", " ", "4", "2"]
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        assert!(PreTokenizer::new("nope")
            .unwrap_err()
            .to_string()
            .contains("supported"));
    }
}
