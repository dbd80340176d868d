//! A budget for a reasoning model's thinking. A row is inside its reasoning from the moment
//! its prompt ends in an opened `<think>` or it writes one, until it writes `</think>`. Past
//! `max_tokens` tokens inside, the closing text (`\n</think>\n\n`) is written in, one token per
//! step, instead of sampled; the answer that follows has its own `max_new_tokens`.

use crate::model::Model;
use crate::{EngineError, Result};
use std::collections::VecDeque;

const OPEN: &str = "<think>";
const END: &str = "</think>";
const CLOSE: &str = "\n</think>\n\n";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkingBudget {
    pub max_tokens: usize,
    open: u32,
    end: u32,
    close: Vec<u32>,
}

impl ThinkingBudget {
    /// The budget for `model`, whose vocabulary must have `<think>` and `</think>` tokens.
    pub fn new(model: &Model, max_tokens: usize) -> Result<Self> {
        let t = &model.tokenizer;
        let (Some(open), Some(end)) = (t.token_to_id(OPEN), t.token_to_id(END)) else {
            return Err(EngineError::Batch(format!(
                "a thinking budget needs a reasoning model: this vocabulary has no {OPEN} and {END} tokens"
            )));
        };
        Ok(Self {
            max_tokens,
            open,
            end,
            close: t.encode(CLOSE, false, true),
        })
    }

    /// The most tokens a row may generate in all: its answer's budget, the reasoning's, the
    /// opening token and the written-in close.
    pub fn total(&self, max_new_tokens: usize) -> usize {
        max_new_tokens + self.max_tokens + 1 + self.close.len()
    }
}

/// Where one row is in its reasoning.
#[derive(Debug)]
pub(crate) struct Thinking {
    budget: ThinkingBudget,
    inside: bool,
    /// Tokens written inside the reasoning, its opening and the close included.
    reasoning: usize,
    used: usize,
    forced: VecDeque<u32>,
}

impl Thinking {
    pub fn start(budget: ThinkingBudget, prompt: &[u32]) -> Self {
        let last = |id: u32| prompt.iter().rposition(|&t| t == id);
        let inside = match (last(budget.open), last(budget.end)) {
            (Some(open), Some(end)) => open > end,
            (Some(_), None) => true,
            _ => false,
        };
        Self {
            budget,
            inside,
            reasoning: 0,
            used: 0,
            forced: VecDeque::new(),
        }
    }

    /// The token to write instead of sampling, once the budget is spent. The whole close
    /// counts as reasoning, the blank line after `</think>` included.
    pub fn forced(&mut self) -> Option<u32> {
        if self.inside && self.used >= self.budget.max_tokens && self.forced.is_empty() {
            self.forced = self.budget.close.iter().copied().collect();
        }
        let token = self.forced.pop_front()?;
        self.reasoning += 1;
        if token == self.budget.end {
            self.inside = false;
        }
        Some(token)
    }

    /// Records a sampled token.
    pub fn record(&mut self, token: u32) {
        if token == self.budget.open && !self.inside {
            self.inside = true;
            self.reasoning += 1;
        } else if self.inside {
            self.reasoning += 1;
            self.used += 1;
            if token == self.budget.end {
                self.inside = false;
            }
        }
    }

    /// Tokens the row wrote inside its reasoning.
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning
    }
}
