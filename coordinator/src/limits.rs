//! What the coordinator accepts of the strings a client sends. Every one is hostile until
//! checked here, at the service edge, before it reaches a log line, a file or the training
//! loop:
//!
//! - *Identity fields* of `RegisterRequest` (host name, device, ring host, dataset digest) are
//!   refused whole when they are longer than their limit or hold control characters: a
//!   worker that sends them is broken or hostile, and no part of such a name is worth keeping.
//! - *Free text* (failure messages, ring errors, a worker's description of its own problem)
//!   is kept, but cut to [`MAX_TEXT_BYTES`] and with every control character escaped, so that
//!   a newline or a terminal escape cannot forge a log line, and a 20 MiB message costs the
//!   log, `metrics.jsonl`, `summary.json` and the resume checkpoint 1 KiB at most.

use std::fmt::Write;

/// Longest host name accepted: DNS names have at most 253 characters.
pub const MAX_HOSTNAME_BYTES: usize = 255;

/// Longest device name accepted (`cpu`, `cuda:N`).
pub const MAX_DEVICE_BYTES: usize = 64;

/// Longest ring host accepted: a DNS name or an IP literal.
pub const MAX_RING_HOST_BYTES: usize = 255;

/// Hex digits of a SHA-256 digest.
pub const DIGEST_HEX_DIGITS: usize = 64;

/// Free text from a client is cut to this many bytes (escapes included) before it goes
/// anywhere.
pub const MAX_TEXT_BYTES: usize = 1024;

/// Checks an identity field: at most `max` bytes, no control characters. The error names the
/// field and its limit, without repeating the value.
pub fn check_identity(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes long; at most {max} are accepted",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|&c| needs_escape(c)) {
        return Err(format!(
            "{field} holds the control character {}; none are accepted",
            c.escape_unicode()
        ));
    }
    Ok(())
}

/// Checks a dataset digest: empty (no local data) or [`DIGEST_HEX_DIGITS`] lower-case hex
/// digits, as `Dataset::digest` writes it.
pub fn check_digest(field: &str, value: &str) -> Result<(), String> {
    let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    if value.is_empty() || (value.len() == DIGEST_HEX_DIGITS && value.chars().all(hex)) {
        return Ok(());
    }
    Err(format!(
        "{field} must be empty or {DIGEST_HEX_DIGITS} lower-case hex digits (a SHA-256); got {} \
         bytes",
        value.len()
    ))
}

/// Client text made safe to log and store: control characters (newlines, ESC, ...) and the
/// Unicode line separators and bidirectional overrides escaped as `\u{..}`, and the whole cut
/// to [`MAX_TEXT_BYTES`], with a note of how much was cut. Reads no more of `text` than it
/// keeps.
pub fn free_text(text: &str) -> String {
    let mut kept = String::with_capacity(text.len().min(MAX_TEXT_BYTES));
    for (at, c) in text.char_indices() {
        let before = kept.len();
        if needs_escape(c) {
            write!(kept, "{}", c.escape_unicode()).expect("writing to a String");
        } else {
            kept.push(c);
        }
        if kept.len() > MAX_TEXT_BYTES {
            kept.truncate(before);
            write!(kept, "... ({} more bytes cut)", text.len() - at).expect("writing to a String");
            break;
        }
    }
    kept
}

/// Characters that could change how a log line or terminal reads: C0 and C1 controls (ESC
/// among them), the Unicode line and paragraph separators, and bidirectional overrides.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identity_fields_over_their_limit_or_with_control_characters_are_refused_by_name() {
        assert_eq!(
            check_identity("hostname", "node-7", MAX_HOSTNAME_BYTES),
            Ok(())
        );
        let long = "a".repeat(MAX_HOSTNAME_BYTES + 1);
        let problem = check_identity("hostname", &long, MAX_HOSTNAME_BYTES).unwrap_err();
        assert!(
            problem.contains("hostname")
                && problem.contains("256 bytes")
                && problem.contains("255"),
            "{problem}"
        );
        let forged = "node\n2026-01-01T00:00:00Z  INFO training complete";
        let problem = check_identity("hostname", forged, MAX_HOSTNAME_BYTES).unwrap_err();
        assert!(
            problem.contains("\\u{a}") && !problem.contains('\n'),
            "{problem}"
        );
        assert!(check_identity("device", "cpu\u{1b}[2J", MAX_DEVICE_BYTES).is_err());
    }

    #[test]
    fn digests_are_empty_or_sixty_four_hex_digits() {
        assert_eq!(check_digest("dataset_digest", ""), Ok(()));
        assert_eq!(check_digest("dataset_digest", &"0f".repeat(32)), Ok(()));
        // Twelve bytes of two-byte characters: slicing at byte 12 would not panic, at 11 it
        // would; neither is a digest.
        for bad in [
            "00ff",
            "é".repeat(32).as_str(),
            &"0F".repeat(32),
            &"0".repeat(65),
        ] {
            let problem = check_digest("dataset_digest", bad).unwrap_err();
            assert!(problem.contains("dataset_digest"), "{problem}");
        }
    }

    #[test]
    fn free_text_escapes_controls_and_is_cut_to_the_limit() {
        assert_eq!(free_text("ring peer 2 timed out"), "ring peer 2 timed out");
        assert_eq!(
            free_text("bad\nINFO forged\u{1b}[31m\u{202e}"),
            "bad\\u{a}INFO forged\\u{1b}[31m\\u{202e}"
        );
        let huge = "x".repeat(20 << 20);
        let kept = free_text(&huge);
        assert!(kept.len() <= MAX_TEXT_BYTES + 40, "{}", kept.len());
        assert!(kept.ends_with(&format!(
            "... ({} more bytes cut)",
            (20 << 20) - MAX_TEXT_BYTES
        )));
    }

    proptest! {
        /// Whatever a client sends, what is kept is one bounded line without controls.
        #[test]
        fn free_text_is_always_one_bounded_line(text in ".{0,3000}") {
            let kept = free_text(&text);
            prop_assert!(kept.len() <= MAX_TEXT_BYTES + 40);
            prop_assert!(!kept.chars().any(needs_escape));
            if text.len() <= MAX_TEXT_BYTES && !text.chars().any(needs_escape) {
                prop_assert_eq!(kept, text);
            }
        }
    }
}
