//! Byte-level BPE (GPT-2 style): every byte of a pre-tokenized word is mapped to a printable
//! character, then adjacent symbols are merged by rank until no ranked pair is left.

use crate::pretokenize::PreTokenizer;
use crate::Result;
use std::collections::HashMap;
use std::sync::OnceLock;

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            table[b as usize] = if printable {
                b as char
            } else {
                let c = char::from_u32(next).expect("valid code point");
                next += 1;
                c
            };
        }
        table
    })
}

fn char_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        byte_to_char()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect()
    })
}

/// The raw bytes of a byte-level token text.
pub fn decode_token(text: &str) -> Vec<u8> {
    let table = char_to_byte();
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            // Not a byte-level character: keep it as UTF-8 rather than lose it.
            None => out.extend(c.to_string().as_bytes()),
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct Bpe {
    pre: PreTokenizer,
    /// Symbol ids: vocabulary ids first, then strings that occur in merges but not in the
    /// vocabulary (a merge may pass through them; they fall back to bytes at the end).
    symbol_text: Vec<String>,
    symbol_id: HashMap<String, u32>,
    n_vocab: u32,
    /// (left, right) -> (rank, merged symbol)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Symbol of each byte's character.
    byte_symbol: [u32; 256],
}

impl Bpe {
    pub fn new(
        tokens: &[String],
        token_to_id: &HashMap<String, u32>,
        merges: &[String],
        pre: &str,
    ) -> Result<Self> {
        let mut symbol_text = tokens.to_vec();
        let mut symbol_id = token_to_id.clone();
        let mut intern = |s: &str| -> u32 {
            if let Some(&id) = symbol_id.get(s) {
                return id;
            }
            let id = symbol_text.len() as u32;
            symbol_text.push(s.to_string());
            symbol_id.insert(s.to_string(), id);
            id
        };
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, line) in merges.iter().enumerate() {
            let Some((left, right)) = line.split_once(' ') else {
                continue;
            };
            let l = intern(left);
            let r = intern(right);
            let m = intern(&format!("{left}{right}"));
            merge_map.entry((l, r)).or_insert((rank as u32, m));
        }
        let mut byte_symbol = [0u32; 256];
        for (b, c) in byte_to_char().iter().enumerate() {
            byte_symbol[b] = intern(&c.to_string());
        }
        Ok(Self {
            pre: PreTokenizer::new(pre)?,
            symbol_text,
            symbol_id,
            n_vocab: tokens.len() as u32,
            merges: merge_map,
            byte_symbol,
        })
    }

    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols = Vec::new();
        for word in self.pre.split(text) {
            symbols.clear();
            // Initial symbols are the byte-level characters of the word.
            symbols.extend(word.bytes().map(|b| self.byte_symbol[b as usize]));
            self.merge(&mut symbols);
            for &s in &symbols {
                if s < self.n_vocab {
                    out.push(s);
                } else {
                    // A symbol with no token of its own: emit its characters' tokens.
                    for c in self.symbol_text[s as usize].chars() {
                        if let Some(&id) = self.symbol_id.get(&c.to_string()) {
                            if id < self.n_vocab {
                                out.push(id);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Repeatedly merges the lowest-ranked adjacent pair (leftmost on ties).
    fn merge(&self, symbols: &mut Vec<u32>) {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..symbols.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(symbols[i], symbols[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { return };
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let text: String = all.iter().map(|&b| byte_to_char()[b as usize]).collect();
        assert_eq!(decode_token(&text), all);
        assert_eq!(byte_to_char()[b' ' as usize], 'Ġ');
        assert_eq!(byte_to_char()[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn merges_apply_by_rank_not_position() {
        let tokens: Vec<String> = ["a", "b", "c", "bc", "abc", "ab"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = vec!["b c".to_string(), "a bc".to_string(), "a b".to_string()];
        let bpe = Bpe::new(&tokens, &ids, &merges, "gpt2").unwrap();
        let mut out = Vec::new();
        bpe.encode("abc", &mut out);
        assert_eq!(out, vec![4]);
        out.clear();
        bpe.encode("ab", &mut out);
        assert_eq!(out, vec![5]);
    }
}
