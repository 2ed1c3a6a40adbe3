//! What an instance writes: each line logged under its target (without terminal escapes), and
//! the last few kept, so that a failed start or an early crash can say what the instance said.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::watch;

/// Lines kept, of stdout and stderr together.
const KEPT_LINES: usize = 5;
/// Characters kept of each line.
const KEPT_CHARS: usize = 300;
/// How long a failed start waits for the rest of the output of an instance that exited (a pipe
/// can hold lines not read yet); a grandchild that keeps the pipe open does not delay it more.
const SETTLE: Duration = Duration::from_millis(200);

/// The last lines of one instance's output.
#[derive(Debug)]
pub struct OutputTail {
    lines: Mutex<VecDeque<String>>,
    /// Streams not yet at their end.
    open: watch::Sender<usize>,
}

impl OutputTail {
    /// Logs `child`'s stdout and stderr under `target`, keeping the last lines.
    pub fn capture(child: &mut Child, target: &str) -> Arc<OutputTail> {
        let tail = Arc::new(OutputTail {
            lines: Mutex::new(VecDeque::with_capacity(KEPT_LINES)),
            open: watch::Sender::new(0),
        });
        let target: Arc<str> = target.into();
        if let Some(out) = child.stdout.take() {
            tail.open.send_modify(|n| *n += 1);
            tokio::spawn(read_lines(out, target.clone(), "stdout", tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tail.open.send_modify(|n| *n += 1);
            tokio::spawn(read_lines(err, target, "stderr", tail.clone()));
        }
        tail
    }

    fn keep(&self, line: &str) {
        let line = match line.char_indices().nth(KEPT_CHARS) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line.to_owned(),
        };
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == KEPT_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// `reason`, followed by the last lines the instance wrote, once its output has ended (or
    /// after a short wait, for an instance that still runs or left a child holding the pipe).
    pub async fn explain(&self, mut reason: String) -> String {
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(SETTLE, open.wait_for(|n| *n == 0)).await;
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.is_empty() {
            reason.push_str("; the instance wrote nothing");
        } else {
            reason.push_str("; its last output: ");
            let quoted: Vec<String> = lines.iter().map(|l| format!("{l:?}")).collect();
            reason.push_str(&quoted.join(", "));
        }
        reason
    }
}

async fn read_lines(
    stream: impl AsyncRead + Unpin,
    target: Arc<str>,
    stream_name: &'static str,
    tail: Arc<OutputTail>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = without_escapes(&line);
        tracing::info!(target: "wakegate::process", target = %target, stream = stream_name, "{line}");
        tail.keep(&line);
    }
    tail.open.send_modify(|n| *n -= 1);
}

/// An instance's output line without its terminal escape sequences (colours, cursor moves,
/// titles), which would reach JSON logs and files as literal escapes.
fn without_escapes(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains('\x1b') {
        return line.into();
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates up to a final byte in @..~.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // OSC (a window title, a hyperlink): up to BEL or ESC \.
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                        break;
                    }
                }
            }
            // nF escapes (a character set: ESC ( B): intermediates, then one final character.
            Some(c) if (' '..='/').contains(&c) => {
                for c in chars.by_ref() {
                    if !(' '..='/').contains(&c) {
                        break;
                    }
                }
            }
            // Any other escape is two characters long.
            _ => {}
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_five_lines_are_kept_each_cut_to_300_characters() {
        let tail = OutputTail {
            lines: Mutex::new(VecDeque::new()),
            open: watch::Sender::new(0),
        };
        assert_eq!(
            tail.explain("exited".into()).await,
            "exited; the instance wrote nothing"
        );
        for n in 1..=6 {
            tail.keep(&format!("line {n}"));
        }
        tail.keep(&"é".repeat(301));
        let why = tail.explain("exited".into()).await;
        let expected = format!(
            "exited; its last output: \"line 3\", \"line 4\", \"line 5\", \"line 6\", \"{}…\"",
            "é".repeat(300)
        );
        assert_eq!(why, expected);
    }

    #[test]
    fn terminal_escapes_are_taken_out_of_instance_output() {
        for (line, expected) in [
            ("plain text", "plain text"),
            ("\x1b[1;31merror\x1b[0m: failed", "error: failed"),
            ("\x1b[2K\x1b[1Gprogress 50%", "progress 50%"),
            ("\x1b]0;a title\x07after", "after"),
            (
                "\x1b]8;;https://example.com\x1b\\link\x1b]8;;\x1b\\",
                "link",
            ),
            ("a\x1b(Bb", "ab"),
            ("unfinished \x1b[31", "unfinished "),
            ("ünïcode \x1b[32mgrün\x1b[m", "ünïcode grün"),
        ] {
            assert_eq!(without_escapes(line), expected, "{line:?}");
        }
    }
}
