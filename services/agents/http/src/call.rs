//! Sends a checked [`Request`], retrying 5xx answers and connection errors with backoff, and
//! turns the answer into the step's output.

use serde_json::{Value, json};

use flotilla_worker::HandlerError;

use crate::request::{Body, Request, extract};

/// The client every step shares.
pub fn client() -> reqwest::Result<reqwest::Client> {
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build()
}

/// How one try ended.
enum Try {
    Answered {
        status: u16,
        body: Vec<u8>,
    },
    /// Worth another try: a 5xx that was not expected, a connection error, a timeout.
    Transient(String),
    /// Another try would end the same way.
    Failed(String),
}

/// Performs `request`: up to `request.retry.max_attempts` tries. The output is
/// `{status, body, extracted}`; `body` is JSON when the answer parses as JSON, text otherwise.
pub async fn call(
    http: &reqwest::Client,
    request: &Request,
    max_body_bytes: usize,
) -> Result<Value, HandlerError> {
    let what = request.describe();
    let mut attempt = 1;
    let (status, bytes) = loop {
        match send(http, request, max_body_bytes).await {
            Try::Answered { status, body } => break (status, body),
            Try::Failed(reason) => {
                return Err(HandlerError::fatal(format!("http: {what} {reason}")));
            }
            Try::Transient(reason) if request.retry.allows_retry_after(attempt) => {
                let delay = request.retry.delay_after(attempt, 0.0);
                tracing::warn!(request = %what, attempt, %reason, ?delay, "http request failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Try::Transient(reason) => {
                return Err(HandlerError::retryable(format!(
                    "http: {what} {reason} (after {attempt} tries)"
                )));
            }
        }
    };
    let body = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let extracted = if request.extract.is_empty() {
        serde_json::Map::new()
    } else {
        extract(&body, &request.extract)
            .map_err(|e| HandlerError::fatal(format!("http: {what} answered {status}: {e}")))?
    };
    Ok(json!({ "status": status, "body": body, "extracted": extracted }))
}

/// One try. Errors never carry the URL (which may hold credentials) or the headers.
async fn send(http: &reqwest::Client, request: &Request, max_body_bytes: usize) -> Try {
    let mut builder = http
        .request(request.method.clone(), request.url.clone())
        .timeout(request.timeout);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    builder = match &request.body {
        Body::None => builder,
        Body::Text(text) => builder.body(text.clone()),
        Body::Json(value) => builder.json(value),
    };
    let mut response = match builder.send().await {
        Ok(response) => response,
        Err(error) => return Try::Transient(format!("failed: {}", error.without_url())),
    };
    let status = response.status();
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > max_body_bytes => {
                if !request.expect.matches(status.as_u16()) {
                    break;
                }
                return Try::Failed(format!(
                    "answered {status} with a body larger than {max_body_bytes} bytes (max_body_bytes)"
                ));
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(error) => {
                return Try::Transient(format!(
                    "failed while reading the answer: {}",
                    error.without_url()
                ));
            }
        }
    }
    if request.expect.matches(status.as_u16()) {
        return Try::Answered {
            status: status.as_u16(),
            body,
        };
    }
    let unexpected = format!(
        "answered {status}, expected {}{}",
        request.expect,
        excerpt(&body)
    );
    if status.is_server_error() {
        Try::Transient(unexpected)
    } else {
        Try::Failed(unexpected)
    }
}

/// `"; body: …"` with the start of an unexpected answer's body, which usually says what is wrong.
fn excerpt(body: &[u8]) -> String {
    const MAX_CHARS: usize = 300;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("; body: {}…", &text[..cut]),
        None => format!("; body: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_core::definition::RetrySpec;
    use flotilla_core::duration::UserDuration;

    use super::*;
    use crate::request::Defaults;

    #[tokio::test]
    async fn connection_errors_are_tried_again_then_fail_retryably() {
        // A port nobody listens on: every try is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let defaults = Defaults {
            timeout: Duration::from_secs(5),
            retry: RetrySpec {
                max_attempts: Some(3),
                delay: Some(UserDuration(Duration::from_millis(10))),
                ..RetrySpec::default()
            },
        };
        let params = json!({"url": format!("http://user:hunter2@127.0.0.1:{port}/x?key=abc")});
        let request = Request::from_params(params.as_object().unwrap(), &defaults).unwrap();
        let error = call(&client().unwrap(), &request, 1024).await.unwrap_err();
        assert!(error.retryable);
        assert!(
            error.message.starts_with(&format!(
                "http: GET http://user:***@127.0.0.1:{port}/x?… failed: "
            )) && error.message.ends_with("(after 3 tries)"),
            "{error}"
        );
        assert!(!error.message.contains("hunter2") && !error.message.contains("abc"));
    }
}
