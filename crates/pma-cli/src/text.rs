//! Text from checkpoints made safe for a terminal.
//!
//! Tensor names, metadata and paths come from files anyone can write. A name holding ESC or
//! other control characters would otherwise reach the terminal raw and could move the cursor,
//! rewrite earlier lines or change the title. Human output escapes them the way Rust's `{:?}`
//! does (`\u{1b}`, `\n`, `\t`); JSON output needs nothing, since serde_json escapes them.

use std::borrow::Cow;

/// `s` with every control character (C0, DEL, C1) written as a Rust escape; borrowed when there
/// are none, which is the usual case.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_tensor_names_are_escaped() {
        assert_eq!(escape_control("model.w"), "model.w");
        assert!(matches!(escape_control("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_control("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape_control("x\ny\tz\u{7f}"), "x\\ny\\tz\\u{7f}");
        assert_eq!(escape_control("\u{9b}31m"), "\\u{9b}31m");
        // Non-control Unicode stays as it is.
        assert_eq!(escape_control("层.权重"), "层.权重");
    }
}
