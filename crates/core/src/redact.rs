//! Credentials never leave the process: URLs are shown with their password hidden.

/// Replaces the password of a URL's user info with `***`: `amqp://guest:***@host:5672/%2f`.
///
/// Works on text that does not parse as a URL too, so that a malformed URL can be shown safely.
/// It errs on the side of hiding: everything between the first `:` after the scheme and the
/// last `@` is hidden, because a password that was not percent-encoded may contain `@` or `/`.
pub fn redact_url(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..authority_start],
        &rest[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_the_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://user:p@ss:w/rd@rabbit.example:5671/vhost?heartbeat=10"),
            "amqps://user:***@rabbit.example:5671/vhost?heartbeat=10"
        );
        assert_eq!(redact_url("amqp://user@host/%2f"), "amqp://user@host/%2f");
        assert_eq!(redact_url("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(redact_url("user:secret@host"), "user:***@host");
        assert_eq!(redact_url("amqp://host/a@b"), "amqp://host/a@b");
        assert_eq!(
            redact_url("postgres://flotilla:s3cret@db:5432/flotilla"),
            "postgres://flotilla:***@db:5432/flotilla"
        );
        // Unencoded `/` and `@` in a password: hide too much rather than part of it.
        assert_eq!(
            redact_url("amqp://u:se/cr@t@host:5672/%2f"),
            "amqp://u:***@host:5672/%2f"
        );
    }
}
