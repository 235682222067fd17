//! A step's params: the request to make, which statuses count as success, and which fields of
//! the answer go into the output. Checked before anything is sent.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use flotilla_core::definition::RetrySpec;
use flotilla_core::duration::UserDuration;
use flotilla_core::retry::RetryPolicy;
use flotilla_worker::HandlerError;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<String>,
    json: Option<Value>,
    #[serde(default)]
    expect_status: Option<Value>,
    timeout: Option<UserDuration>,
    retry: Option<RetrySpec>,
    #[serde(default)]
    extract: BTreeMap<String, String>,
}

fn get() -> String {
    "GET".into()
}

/// What a request sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    None,
    Text(String),
    Json(Value),
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: reqwest::Url,
    pub headers: BTreeMap<String, String>,
    pub body: Body,
    pub expect: Expect,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Output name → JSON pointer into the response body.
    pub extract: BTreeMap<String, String>,
}

/// The agent's defaults for what a step does not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub timeout: Duration,
    pub retry: RetrySpec,
}

impl Request {
    /// Reads and checks a step's params. Every fault is fatal: another attempt would repeat it.
    pub fn from_params(
        params: &Map<String, Value>,
        defaults: &Defaults,
    ) -> Result<Self, HandlerError> {
        let fatal = |message: String| HandlerError::fatal(format!("http: {message}"));
        let params: Params = serde_json::from_value(Value::Object(params.clone()))
            .map_err(|e| fatal(format!("invalid params: {e}")))?;
        let method = reqwest::Method::from_bytes(params.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| fatal(format!("`{}` is not an HTTP method", params.method)))?;
        let url = reqwest::Url::parse(&params.url)
            .map_err(|e| fatal(format!("`{}` is not a URL: {e}", shown_url(&params.url))))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fatal(format!(
                "`{}` is not an http or https URL",
                shown_url(&params.url)
            )));
        }
        let body = match (params.body, params.json) {
            (Some(_), Some(_)) => return Err(fatal("give `body` or `json`, not both".into())),
            (Some(text), None) => Body::Text(text),
            (None, Some(json)) => Body::Json(json),
            (None, None) => Body::None,
        };
        for (name, value) in &params.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| fatal(format!("`{name}` is not a valid header name")))?;
            // The value may be a secret: it is not quoted.
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| fatal(format!("the value of header `{name}` is not valid")))?;
        }
        let expect = match &params.expect_status {
            None => Expect::default(),
            Some(value) => Expect::parse(value).map_err(fatal)?,
        };
        let timeout = params.timeout.map_or(defaults.timeout, |t| t.0);
        if timeout.is_zero() {
            return Err(fatal("timeout must be longer than 0".into()));
        }
        let retry = RetryPolicy::resolve(params.retry.as_ref(), Some(&defaults.retry))
            .map_err(|e| fatal(e.to_string()))?;
        let extract = params
            .extract
            .into_iter()
            .map(|(name, expression)| {
                pointer(&expression)
                    .map(|pointer| (name.clone(), pointer))
                    .map_err(|e| fatal(format!("extract `{name}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            method,
            url,
            headers: params.headers,
            body,
            expect,
            timeout,
            retry,
            extract,
        })
    }

    /// `METHOD url` for messages, without credentials or query.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method, shown_url(self.url.as_str()))
    }
}

/// A URL as errors and logs show it: the password hidden, the query (which often carries
/// tokens) left out.
pub fn shown_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{}?…", flotilla_core::redact_url(base)),
        None => flotilla_core::redact_url(url),
    }
}

/// The statuses that count as success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect(Vec<RangeInclusive<u16>>);

impl Default for Expect {
    /// Any 2xx.
    fn default() -> Self {
        Self(vec![200..=299])
    }
}

impl Expect {
    /// `200`, `"2xx"`, `"200-204"`, or a list of those.
    pub fn parse(value: &Value) -> Result<Self, String> {
        let items = match value {
            Value::Array(items) if !items.is_empty() => items.as_slice(),
            Value::Array(_) => return Err("expect_status is an empty list".into()),
            one => std::slice::from_ref(one),
        };
        items.iter().map(range).collect::<Result<_, _>>().map(Self)
    }

    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|range| range.contains(&status))
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .0
            .iter()
            .map(|range| match (range.start(), range.end()) {
                (a, b) if a == b => a.to_string(),
                (a, b) if a % 100 == 0 && *b == a + 99 => format!("{}xx", a / 100),
                (a, b) => format!("{a}-{b}"),
            })
            .collect();
        f.write_str(&shown.join(", "))
    }
}

fn range(value: &Value) -> Result<RangeInclusive<u16>, String> {
    let invalid = || {
        format!(
            "expect_status `{value}` is not a status, a class such as 2xx, or a range such as 200-204"
        )
    };
    let status = |text: &str| -> Result<u16, String> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(invalid)
    };
    let range = match value {
        Value::Number(n) => {
            let s = n.as_u64().map(|n| n.to_string()).ok_or_else(invalid)?;
            let s = status(&s)?;
            s..=s
        }
        Value::String(text) => {
            let text = text.trim().to_ascii_lowercase();
            if let Some(class) = text.strip_suffix("xx") {
                let start = status(&format!("{class}00"))?;
                start..=start + 99
            } else if let Some((low, high)) = text.split_once('-') {
                let (low, high) = (status(low)?, status(high)?);
                if low > high {
                    return Err(invalid());
                }
                low..=high
            } else {
                let s = status(&text)?;
                s..=s
            }
        }
        _ => return Err(invalid()),
    };
    Ok(range)
}

/// A JSON pointer (`/data/0/id`) as is, or a path (`$.data[0].id`) turned into one.
pub fn pointer(expression: &str) -> Result<String, String> {
    if expression.is_empty() || expression.starts_with('/') {
        return Ok(expression.to_string());
    }
    let Some(mut rest) = expression.strip_prefix('$') else {
        return Err(format!(
            "`{expression}` is neither a JSON pointer (/a/0/b) nor a path ($.a[0].b)"
        ));
    };
    let mut pointer = String::new();
    while !rest.is_empty() {
        let (segment, next) = if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            (&after[..end], &after[end..])
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after
                .find(']')
                .ok_or_else(|| format!("`{expression}` has a `[` without `]`"))?;
            let index = &after[..end];
            if index.parse::<usize>().is_err() {
                return Err(format!("`{expression}`: `[{index}]` is not an array index"));
            }
            (index, &after[end + 1..])
        } else {
            return Err(format!(
                "`{expression}`: expected `.name` or `[index]` at `{rest}`"
            ));
        };
        if segment.is_empty() {
            return Err(format!("`{expression}` has an empty segment"));
        }
        pointer.push('/');
        pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
        rest = next;
    }
    Ok(pointer)
}

/// The extracted fields of a response body, by output name.
pub fn extract(
    body: &Value,
    fields: &BTreeMap<String, String>,
) -> Result<Map<String, Value>, String> {
    fields
        .iter()
        .map(|(name, pointer)| {
            body.pointer(pointer)
                .map(|value| (name.clone(), value.clone()))
                .ok_or_else(|| format!("field `{name}` ({pointer}) is not in the response body"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            timeout: Duration::from_secs(30),
            retry: RetrySpec {
                max_attempts: Some(3),
                ..RetrySpec::default()
            },
        }
    }

    fn request(params: Value) -> Result<Request, HandlerError> {
        Request::from_params(params.as_object().unwrap(), &defaults())
    }

    #[test]
    fn statuses_match_numbers_classes_ranges_and_lists() {
        let expect = Expect::parse(&json!([201, "3xx", "400-404"])).unwrap();
        for status in [201, 300, 399, 400, 404] {
            assert!(expect.matches(status), "{status}");
        }
        for status in [200, 202, 405, 500] {
            assert!(!expect.matches(status), "{status}");
        }
        assert_eq!(expect.to_string(), "201, 3xx, 400-404");
        assert!(Expect::default().matches(204));
        assert!(!Expect::default().matches(404));
        assert_eq!(Expect::parse(&json!("404")).unwrap().to_string(), "404");
    }

    #[test]
    fn malformed_statuses_are_refused() {
        for bad in [
            json!("6xx"),
            json!(99),
            json!("204-200"),
            json!("ok"),
            json!([]),
            json!(true),
            json!(2.5),
        ] {
            assert!(Expect::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_become_pointers() {
        assert_eq!(pointer("$.data[0].id").unwrap(), "/data/0/id");
        assert_eq!(pointer("$").unwrap(), "");
        assert_eq!(pointer("$.a/b.c~d").unwrap(), "/a~1b/c~0d");
        assert_eq!(pointer("/data/0/id").unwrap(), "/data/0/id");
        for bad in ["data.id", "$.", "$[x]", "$[0", "$..a", "$x"] {
            assert!(pointer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn extraction_names_the_missing_field() {
        let body = json!({"data": [{"id": 7, "tags": ["a"]}]});
        let fields = BTreeMap::from([
            ("id".to_string(), pointer("$.data[0].id").unwrap()),
            ("tag".to_string(), "/data/0/tags/0".to_string()),
        ]);
        assert_eq!(
            extract(&body, &fields).unwrap(),
            json!({"id": 7, "tag": "a"}).as_object().cloned().unwrap()
        );
        let missing = BTreeMap::from([("name".to_string(), "/data/0/name".to_string())]);
        assert_eq!(
            extract(&body, &missing).unwrap_err(),
            "field `name` (/data/0/name) is not in the response body"
        );
    }

    #[test]
    fn params_are_checked_before_sending() {
        let request = request(json!({
            "method": "post", "url": "https://api.example/v1/items",
            "headers": {"Authorization": "Bearer s3cret"}, "json": {"a": 1},
            "expect_status": 201, "timeout": "2s", "retry": {"max_attempts": 5},
            "extract": {"id": "$.id"}
        }))
        .unwrap();
        assert_eq!(request.method, reqwest::Method::POST);
        assert_eq!(request.body, Body::Json(json!({"a": 1})));
        assert_eq!(request.timeout, Duration::from_secs(2));
        assert_eq!(request.retry.max_attempts, 5);
        assert_eq!(request.extract["id"], "/id");
        assert_eq!(request.describe(), "POST https://api.example/v1/items");

        for (params, expected) in [
            (json!({}), "missing field `url`"),
            (json!({"url": "ftp://host/x"}), "not an http or https URL"),
            (json!({"url": "not a url"}), "is not a URL"),
            (
                json!({"url": "http://h", "method": "GE T"}),
                "not an HTTP method",
            ),
            (
                json!({"url": "http://h", "body": "x", "json": 1}),
                "not both",
            ),
            (
                json!({"url": "http://h", "headers": {"bad header": "x"}}),
                "not a valid header name",
            ),
            (
                json!({"url": "http://h", "retry": {"max_attempts": 0}}),
                "max_attempts",
            ),
            (
                json!({"url": "http://h", "extract": {"x": "id"}}),
                "extract `x`",
            ),
            (
                json!({"url": "http://h", "verb": "GET"}),
                "unknown field `verb`",
            ),
        ] {
            let error = self::request(params.clone()).unwrap_err();
            assert!(!error.retryable);
            assert!(error.message.contains(expected), "{params}: {error}");
        }
    }

    #[test]
    fn shown_urls_hide_passwords_and_queries() {
        assert_eq!(
            shown_url("https://bot:hunter2@hooks.example/x?token=abc"),
            "https://bot:***@hooks.example/x?…"
        );
        let error = request(json!({"url": "ftp://u:hunter2@h/?k=abc"})).unwrap_err();
        assert!(
            !error.message.contains("hunter2") && !error.message.contains("abc"),
            "{error}"
        );
        let error =
            request(json!({"url": "http://h", "headers": {"X-Key": "bad\nvalue"}})).unwrap_err();
        assert!(!error.message.contains("bad\nvalue"), "{error}");
    }
}
