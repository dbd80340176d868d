//! Stop sequences over streamed text: text is released as soon as it cannot be the start of a
//! stop sequence, and nothing from the first stop sequence on is ever released.

#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    /// Text held back because it could begin a stop sequence.
    pending: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds `text`; returns what may be released now, and whether a stop sequence was reached.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.stopped = true;
            let released = self.pending[..at].to_string();
            self.pending.clear();
            return (released, true);
        }
        let held = self.longest_stop_prefix_suffix();
        let released = self.pending[..self.pending.len() - held].to_string();
        self.pending.drain(..self.pending.len() - held);
        (released, false)
    }

    /// The text still held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Bytes at the end of `pending` that a stop sequence starts with (on a char boundary).
    fn longest_stop_prefix_suffix(&self) -> usize {
        let text = &self.pending;
        (1..=text.len())
            .rev()
            .filter(|&n| text.is_char_boundary(text.len() - n))
            .find(|&n| {
                let tail = &text[text.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut filter = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = filter.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&filter.finish());
        (out, false)
    }

    #[test]
    fn a_stop_split_across_pieces_is_never_released() {
        assert_eq!(run(&["END"], &["a E", "N", "D b"]), ("a ".into(), true));
        assert_eq!(run(&["\n\n"], &["x\n", "\ny"]), ("x".into(), true));
    }

    #[test]
    fn a_near_miss_is_released_once_it_cannot_match() {
        let mut f = StopFilter::new(vec!["END".into()]);
        assert_eq!(f.push("a EN"), ("a ".into(), false));
        assert_eq!(f.push("x"), ("ENx".into(), false));
        assert_eq!(run(&["END"], &["EN"]), ("EN".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn the_earliest_stop_wins_and_multibyte_text_is_cut_on_characters() {
        assert_eq!(run(&["b", "a"], &["xab"]), ("x".into(), true));
        assert_eq!(run(&["好的"], &["你好", "的"]), ("你".into(), true));
        assert_eq!(run(&["é!"], &["café"]), ("café".into(), false));
        let mut f = StopFilter::new(vec!["é!".into()]);
        assert_eq!(f.push("café"), ("caf".into(), false));
    }
}
