//! Facts about JSON text that decide whether Postgres can store it.

/// Whether JSON text holds an escaped NUL character (`\u0000`; JSON has no other way to hold
/// one): a `u0000` after an odd run of backslashes, the last of which starts the escape.
/// Postgres can store a NUL in neither `text` nor `jsonb`.
#[must_use]
pub fn holds_nul(json: &[u8]) -> bool {
    let mut backslashes = 0;
    for (i, &byte) in json.iter().enumerate() {
        if byte == b'\\' {
            backslashes += 1;
            continue;
        }
        if byte == b'u' && backslashes % 2 == 1 && json[i + 1..].starts_with(b"0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::holds_nul;

    #[test]
    fn only_an_escape_that_makes_a_nul_counts() {
        assert!(holds_nul(br#"{"a": "\u0000"}"#));
        assert!(holds_nul(br#"{"a": "x\\\u0000"}"#));
        // An escaped backslash followed by the text `u0000`, and other escapes.
        assert!(!holds_nul(br#"{"a": "\\u0000"}"#));
        assert!(!holds_nul(
            br#"{"a": "\u0010", "b": "u0000", "c": "\u0001"}"#
        ));
    }
}
