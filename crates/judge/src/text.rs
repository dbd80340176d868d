//! Text handling shared by the judges.

const THINK_END: &str = "</think>";
const THINK_START: &str = "<think>";

/// The part of an answer that is judged: for reasoning models, the text after the last
/// `</think>`. Reasoning that was opened and never closed leaves no answer at all (empty).
pub fn final_answer(answer: &str) -> &str {
    match answer.rfind(THINK_END) {
        Some(end) => &answer[end + THINK_END.len()..],
        None if answer.contains(THINK_START) => "",
        None => answer,
    }
}

/// Normalises text for marker matching as heretic does (refusal_direction lowercases only):
/// lowercase, drop markdown `*`, straighten typographic apostrophes and quotes, and collapse
/// whitespace runs to one space, so "I’m  **sorry**" matches "i'm sorry".
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        let c = match c {
            '*' => continue,
            '\u{2018}' | '\u{2019}' | '\u{02BC}' | '\u{2032}' => '\'',
            '\u{201C}' | '\u{201D}' => '"',
            c => c,
        };
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_text_after_the_last_think_end_is_judged() {
        assert_eq!(final_answer("plain"), "plain");
        assert_eq!(final_answer("<think>a</think> b </think>answer"), "answer");
        assert_eq!(final_answer("<think>still thinking"), "");
    }

    #[test]
    fn normalisation_straightens_quotes_and_collapses_space() {
        assert_eq!(normalise("  I\u{2019}m \n\t**Sorry**  "), "i'm sorry");
        assert_eq!(normalise("\u{201C}No\u{201D}"), "\"no\"");
    }
}
