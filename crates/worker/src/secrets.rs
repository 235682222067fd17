//! Secrets a task's params refer to (`${{ secrets.NAME }}`), resolved here, on the worker, just
//! before the handler runs: the coordinator stores and sends only the reference. A secret's
//! value comes from the environment variable `FLOTILLA_SECRET_<NAME>`, else from the file
//! `<NAME>` of the worker's secrets directory (a mounted Kubernetes or Docker secret; one
//! trailing line break dropped). Whatever the task sends back — output, error, step log — has
//! each value it was given replaced by [`MASK`].

use std::path::PathBuf;

use flotilla_core::template::secret_references;
use serde_json::{Map, Value};

/// What a secret's value is replaced by in what leaves the worker.
pub const MASK: &str = "***";
/// The environment variable of secret `NAME` is this prefix followed by `NAME`.
pub const ENV_PREFIX: &str = "FLOTILLA_SECRET_";

/// Where a worker reads secrets from.
#[derive(Debug, Clone, Default)]
pub(crate) struct Source {
    pub(crate) dir: Option<PathBuf>,
}

impl Source {
    /// Replaces every secret reference in `params` by the secret's value; answers what hides
    /// those values again. A secret that is set nowhere is an error naming it and where it was
    /// looked for.
    pub(crate) fn resolve(&self, params: &mut Map<String, Value>) -> Result<Redactor, String> {
        let mut redactor = Redactor::default();
        let mut fault = None;
        for value in params.values_mut() {
            visit_strings_mut(value, &mut |text| {
                let references = secret_references(text);
                if references.is_empty() || fault.is_some() {
                    return;
                }
                let mut resolved = String::with_capacity(text.len());
                let mut last = 0;
                for (range, name) in references {
                    match self.value(name) {
                        Ok(secret) => {
                            resolved.push_str(&text[last..range.start]);
                            resolved.push_str(&secret);
                            redactor.add(secret);
                            last = range.end;
                        }
                        Err(e) => {
                            fault = Some(e);
                            return;
                        }
                    }
                }
                resolved.push_str(&text[last..]);
                *text = resolved;
            });
        }
        match fault {
            Some(e) => Err(e),
            None => Ok(redactor),
        }
    }

    fn value(&self, name: &str) -> Result<String, String> {
        if let Ok(value) = std::env::var(format!("{ENV_PREFIX}{name}")) {
            return Ok(value);
        }
        let Some(dir) = &self.dir else {
            return Err(format!(
                "secret `{name}` is not set on this worker ({ENV_PREFIX}{name}, and no secrets directory)"
            ));
        };
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map(|mut value| {
                if value.ends_with('\n') {
                    value.pop();
                    if value.ends_with('\r') {
                        value.pop();
                    }
                }
                value
            })
            .map_err(|e| {
                format!(
                    "secret `{name}` is not set on this worker ({ENV_PREFIX}{name}, nor {}: {e})",
                    path.display()
                )
            })
    }
}

/// Hides the values of the secrets a task was given.
#[derive(Debug, Clone, Default)]
pub(crate) struct Redactor {
    /// Longest first, so that a secret holding another is hidden whole.
    values: Vec<String>,
}

impl Redactor {
    fn add(&mut self, value: String) {
        if !value.is_empty() && !self.values.contains(&value) {
            self.values.push(value);
            self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    /// `text` with every secret value replaced by [`MASK`].
    pub(crate) fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), MASK);
            }
        }
        out
    }

    /// Hides secret values in every string of `value`, keys included.
    pub(crate) fn json(&self, value: &mut Value) {
        if self.values.is_empty() {
            return;
        }
        match value {
            Value::String(s) => *s = self.text(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.json(v)),
            Value::Object(map) => {
                let fields = std::mem::take(map);
                for (key, mut v) in fields {
                    self.json(&mut v);
                    map.insert(self.text(&key), v);
                }
            }
            _ => {}
        }
    }
}

fn visit_strings_mut(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| visit_strings_mut(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| visit_strings_mut(v, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn references_resolve_from_the_directory_and_values_are_hidden_again() {
        let dir = std::env::temp_dir().join(format!("flotilla-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("DB_PASSWORD"), "s3cr3t-value\n").unwrap();
        let source = Source {
            dir: Some(dir.clone()),
        };
        let mut params = json!({
            "password": "${{ secrets.DB_PASSWORD }}",
            "url": ["postgres://app:${{secrets.DB_PASSWORD}}@db/app"],
            "plain": 3
        })
        .as_object()
        .cloned()
        .unwrap();
        let redactor = source.resolve(&mut params).unwrap();
        assert_eq!(
            Value::Object(params.clone()),
            json!({"password": "s3cr3t-value", "url": ["postgres://app:s3cr3t-value@db/app"], "plain": 3})
        );
        let mut output = json!({"echo": params, "s3cr3t-value": true});
        redactor.json(&mut output);
        assert_eq!(
            output,
            json!({"echo": {"password": "***", "url": ["postgres://app:***@db/app"], "plain": 3}, "***": true})
        );
        assert_eq!(redactor.text("failed with s3cr3t-value"), "failed with ***");

        let mut missing = json!({"k": "${{ secrets.NOT_THERE_ANYWHERE }}"})
            .as_object()
            .cloned()
            .unwrap();
        let err = source.resolve(&mut missing).unwrap_err();
        assert!(
            err.starts_with("secret `NOT_THERE_ANYWHERE` is not set on this worker (FLOTILLA_SECRET_NOT_THERE_ANYWHERE, nor "),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
