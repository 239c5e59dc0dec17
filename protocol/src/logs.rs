//! Logs as lines, in bounded memory.
//!
//! A container's log reaches `keel logs` as lines: the agent cuts the
//! engine's chunks into lines, and the controller prefixes each with its
//! instance. Both sides hold at most [`MAX_LOG_LINE_BYTES`] of an unfinished
//! line, so no app (and no node posting a log answer) can grow either
//! process by writing without newlines. One splitter serves both.

/// The longest line a log stream gives whole: 64 KiB. A longer one
/// arrives as several lines of at most this many bytes each.
///
/// Why pieces and not truncation with a marker: a user of `kubectl logs`
/// or `docker logs` gets every byte the app wrote, however long its lines
/// (Docker and containerd cut lines at 16 KiB internally and their readers
/// put them back together); losing the rest of a line is a surprise that
/// hides data, an extra line break is not. Why a limit at all: the log
/// travels as lines (the controller prefixes each with its instance), so
/// a line must be held whole before it is sent, and an app writing
/// without newlines would otherwise grow the agent without bound. Why
/// 64 KiB rather than Docker's 16 KiB: structured (JSON) log lines of a
/// few tens of KiB stay whole, and the cost is only this much memory per
/// log being read.
pub const MAX_LOG_LINE_BYTES: usize = 64 * 1024;

/// Turns a log's chunks into lines (without their newline, and without a
/// trailing `\r`), holding at most [`MAX_LOG_LINE_BYTES`] between chunks.
/// Works on bytes, so a character split across two chunks stays whole;
/// invalid UTF-8 becomes U+FFFD.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// The lines this chunk completes, and the pieces of any line that
    /// grew past the limit.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        // Only the new bytes are searched: a long line costs linear time.
        while let Some(at) = chunk.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&chunk[..at]);
            self.cut_pieces(&mut lines);
            lines.push(line_text(&self.partial));
            self.partial.clear();
            chunk = &chunk[at + 1..];
        }
        self.partial.extend_from_slice(chunk);
        self.cut_pieces(&mut lines);
        lines
    }

    /// How many bytes of an unfinished line are held.
    pub fn held_bytes(&self) -> usize {
        self.partial.len()
    }

    /// What is left when the log ends: a last line without its newline.
    pub fn finish(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let line = line_text(&self.partial);
        self.partial.clear();
        Some(line)
    }

    /// Sends the front of a line longer than the limit as pieces, until
    /// what is held fits. A piece ends before a character that would
    /// straddle the cut (UTF-8 characters are at most 4 bytes).
    fn cut_pieces(&mut self, lines: &mut Vec<String>) {
        let mut start = 0;
        while self.partial.len() - start > MAX_LOG_LINE_BYTES {
            let mut end = start + MAX_LOG_LINE_BYTES;
            let mut back = end;
            while back > end - 3 && is_continuation(self.partial[back]) {
                back -= 1;
            }
            if !is_continuation(self.partial[back]) {
                end = back;
            }
            lines.push(String::from_utf8_lossy(&self.partial[start..end]).into_owned());
            start = end;
        }
        if start > 0 {
            self.partial.drain(..start);
            // A buffer that once held a long chunk gives its memory back.
            self.partial.shrink_to(2 * MAX_LOG_LINE_BYTES);
        }
    }
}

/// A UTF-8 continuation byte (`10xxxxxx`): no character starts here.
fn is_continuation(byte: u8) -> bool {
    byte & 0b1100_0000 == 0b1000_0000
}

fn line_text(bytes: &[u8]) -> String {
    let mut end = bytes.len();
    while end > 0 && bytes[end - 1] == b'\r' {
        end -= 1;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_chunks_become_lines_across_chunk_boundaries() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"one\ntw"), ["one"]);
        assert_eq!(splitter.push(b"o\r\n\nthr"), ["two", ""]);
        // A character split across two chunks stays whole.
        let euro = "\u{20ac}".as_bytes();
        assert!(splitter.push(&euro[..1]).is_empty());
        assert_eq!(
            splitter.push(&[&euro[1..], b"\n"].concat()),
            ["thr\u{20ac}"]
        );
        assert_eq!(splitter.push(b"last"), Vec::<String>::new());
        assert_eq!(splitter.finish().as_deref(), Some("last"));
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn a_line_longer_than_the_limit_comes_as_pieces_and_nothing_is_lost() {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        // Written without a newline, in Docker's 16 KiB frames: what is
        // held never exceeds the limit.
        let frame = vec![b'x'; 16 * 1024];
        for _ in 0..20 {
            lines.extend(splitter.push(&frame));
            assert!(splitter.held_bytes() <= MAX_LOG_LINE_BYTES);
        }
        lines.extend(splitter.push(b"end\n"));
        let total: usize = lines.iter().map(String::len).sum();
        assert_eq!(total, 20 * 16 * 1024 + 3);
        assert!(lines.iter().all(|l| l.len() <= MAX_LOG_LINE_BYTES));
        assert_eq!(lines.len(), 6, "5 pieces of 64 KiB, then the rest");
        assert!(lines[5].ends_with("end"));

        // A line of exactly the limit is one line, not a piece and an
        // empty line.
        let exact = vec![b'y'; MAX_LOG_LINE_BYTES];
        assert_eq!(splitter.push(&exact), Vec::<String>::new());
        assert_eq!(splitter.push(b"\n").len(), 1);

        // A cut never splits a character: 3-byte characters do not divide
        // the limit, and every piece is valid text.
        let text = "\u{20ac}".repeat(MAX_LOG_LINE_BYTES / 3 * 2 + 7);
        let mut pieces = splitter.push(text.as_bytes());
        pieces.extend(splitter.finish());
        assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')));
        assert_eq!(pieces.concat(), text);
    }
}
