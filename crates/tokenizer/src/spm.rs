//! SentencePiece-style tokenization as llama.cpp does it for `tokenizer.ggml.model = llama`:
//! spaces become `▁`, characters are merged pairwise by the score of the merged token (highest
//! first, leftmost on ties), and whatever is left without a token falls back to byte tokens.

use crate::TokenType;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

#[derive(Debug, Clone)]
pub struct Spm {
    token_to_id: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
}

/// The bytes a token stands for: `▁` is a space, `<0xAB>` byte tokens are that byte.
pub fn decode_token(text: &str, ty: TokenType) -> Vec<u8> {
    if ty == TokenType::Byte {
        if let Some(b) = text
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            return vec![b];
        }
    }
    text.replace('\u{2581}', " ").into_bytes()
}

#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    pub fn new(tokens: &[String], types: &[TokenType], scores: Vec<f32>) -> Self {
        let token_to_id: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_to_id
                .get(&format!("<0x{b:02X}>"))
                .copied()
                .filter(|&id| types[id as usize] == TokenType::Byte);
            if slot.is_none() {
                // Vocabularies without byte tokens may still hold the character itself.
                *slot = std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| token_to_id.get(s).copied());
            }
        }
        Self {
            token_to_id,
            scores,
            byte_tokens,
        }
    }

    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let text = text.replace(' ', "\u{2581}");
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        if symbols.is_empty() {
            return;
        }
        let mut queue = BinaryHeap::new();
        let try_add = |symbols: &[Symbol],
                       left: Option<usize>,
                       right: Option<usize>,
                       queue: &mut BinaryHeap<Bigram>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let start = symbols[l].start;
            let len = symbols[l].len + symbols[r].len;
            if let Some(&id) = self.token_to_id.get(&text[start..start + len]) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    len,
                });
            }
        };
        for i in 1..symbols.len() {
            try_add(&symbols, Some(i - 1), Some(i), &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (bigram.left, bigram.right);
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != bigram.len
            {
                continue; // outdated: one side was merged into something else since
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            try_add(&symbols, symbols[l].prev, Some(l), &mut queue);
            try_add(&symbols, Some(l), symbols[l].next, &mut queue);
        }
        // A merged symbol is always a token; a single character may not be, and falls back to
        // its bytes.
        let mut i = Some(0);
        while let Some(s) = i {
            let piece = &text[symbols[s].start..symbols[s].start + symbols[s].len];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = symbols[s].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Spm {
        let tokens: Vec<String> = ["<unk>", "▁", "h", "i", "hi", "▁hi", "<0x21>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let types = vec![
            TokenType::Unknown,
            TokenType::Normal,
            TokenType::Normal,
            TokenType::Normal,
            TokenType::Normal,
            TokenType::Normal,
            TokenType::Byte,
        ];
        Spm::new(
            &tokens,
            &types,
            vec![0.0, -1.0, -2.0, -2.0, -0.5, -0.1, 0.0],
        )
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let mut out = Vec::new();
        toy().encode(" hi!", &mut out);
        assert_eq!(out, vec![5, 6]);
    }

    #[test]
    fn byte_tokens_decode_to_their_byte() {
        assert_eq!(decode_token("<0x21>", TokenType::Byte), b"!");
        assert_eq!(decode_token("▁hi", TokenType::Normal), b" hi");
    }
}
