//! Incremental detokenization and stop strings.
//!
//! Text is released token by token, but held back while it ends in an incomplete UTF-8 character (the decoder
//! yields U+FFFD) or in a prefix of a stop string, so a stop string spanning token boundaries is never streamed
//! out before it is recognised. The stop string itself is not returned.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded output so far, and how much of it has been released.
    text: String,
    sent: usize,
    stop: Vec<String>,
}

/// What one new token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Text safe to release now.
    pub text: String,
    /// A stop string was found; the output ends before it.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stop: Vec<String>) -> Self {
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0, text: String::new(), sent: 0, stop }
    }

    /// Adds a generated token.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Step> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{fffd}') && full.is_char_boundary(prefix.len()) {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.release())
    }

    /// Releases what is left at the end of the sequence.
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        rest
    }

    fn release(&mut self) -> Step {
        // Search from early enough that a stop string straddling released text is found.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p)).min();
        if let Some(pos) = found {
            let end = pos.max(self.sent);
            let out = self.text[self.sent..end].to_string();
            self.text.truncate(end);
            self.sent = end;
            return Step { text: out, stopped: true };
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut safe = self.text.len();
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    safe = safe.min(self.text.len() - i);
                }
            }
        }
        let safe = safe.max(self.sent);
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        Step { text: out, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stop: &[&str], text: &str) -> (String, bool) {
        let tok = Tokenizer::byte_level();
        let mut s = TextStream::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for b in text.bytes() {
            let step = s.push(&tok, u32::from(b)).unwrap();
            out.push_str(&step.text);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn stop_string_spanning_tokens_ends_output_before_it() {
        assert_eq!(feed(&["END"], "hello EN world END tail"), ("hello EN world ".into(), true));
        assert_eq!(feed(&["\n\n"], "a\nb\n\nc"), ("a\nb".into(), true));
    }

    #[test]
    fn partial_stop_prefix_is_released_at_the_end() {
        assert_eq!(feed(&["STOP"], "abc ST"), ("abc ST".into(), false));
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let tok = Tokenizer::byte_level();
        let mut s = TextStream::new(vec![]);
        let mut pieces = Vec::new();
        for b in "é日".bytes() {
            pieces.push(s.push(&tok, u32::from(b)).unwrap().text);
        }
        assert_eq!(pieces, vec!["", "é", "", "", "日"]);
    }
}
