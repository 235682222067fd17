//! `condition:` expressions, in CEL (the Common Expression Language).
//!
//! Each step that finished before the condition's step is a variable: `<id>.success`,
//! `<id>.failed`, `<id>.skipped`, `<id>.status` describe how it ended, `<id>.output` is its whole
//! JSON output, and `<id>.<field>` reads a field of that output (the four reserved names win over
//! output fields of the same name). `params` holds the run's params.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The variable that holds the run's params.
pub const PARAMS: &str = "params";

/// The longest condition accepted; conditions are meant to be short decisions.
pub const MAX_LENGTH: usize = 4_096;

/// A parsed condition.
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<cel::Program>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// How a finished step looks to a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Success,
    Failure,
    Skipped,
}

impl Finished {
    fn as_str(self) -> &'static str {
        match self {
            Finished::Success => "success",
            Finished::Failure => "failure",
            Finished::Skipped => "skipped",
        }
    }
}

impl Condition {
    /// Parses a condition; the error carries the parser's message with a caret under the fault.
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.len() > MAX_LENGTH {
            return Err(format!("is longer than {MAX_LENGTH} characters"));
        }
        let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
        Ok(Self {
            source: source.to_string(),
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The top-level names the expression reads (step ids and `params`).
    pub fn variables(&self) -> BTreeSet<String> {
        self.program
            .references()
            .variables()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Evaluates the condition. `resolve` tells what a name other than `params` stands for: a
    /// step that finished (how, and its output), or a value. A result that is not a boolean, a
    /// name nothing stands for, or a missing field is an error naming the fault.
    pub fn evaluate<'a>(
        &self,
        params: &Map<String, Value>,
        mut resolve: impl FnMut(&str) -> Option<Binding<'a>>,
    ) -> Result<bool, String> {
        let mut ctx = cel::Context::default();
        for name in self.program.references().variables() {
            let value = if name == PARAMS {
                Value::Object(params.clone())
            } else {
                match resolve(name) {
                    Some(Binding::Step(finished, output)) => step_variable(finished, output),
                    Some(Binding::Value(value)) => value,
                    None => {
                        return Err(format!(
                            "`{name}` is neither a step that finished before this one, nor a field of their outputs, nor a run param"
                        ));
                    }
                }
            };
            ctx.add_variable(name, value)
                .map_err(|e| format!("cannot bind `{name}`: {e}"))?;
        }
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "`{}` gives {other:?}, not true or false",
                self.source
            )),
            Err(e) => Err(format!("`{}` cannot be evaluated: {e}", self.source)),
        }
    }
}

/// What a name in a condition stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Binding<'a> {
    /// A step that finished: `<id>.success`, `<id>.<field>`, …
    Step(Finished, Option<&'a Value>),
    /// A bare name: a field of an earlier step's output, or a run param.
    Value(Value),
}

fn step_variable(finished: Finished, output: Option<&Value>) -> Value {
    let mut fields = match output {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    };
    fields.insert("output".into(), output.cloned().unwrap_or(Value::Null));
    fields.insert("status".into(), Value::from(finished.as_str()));
    fields.insert("success".into(), Value::from(finished == Finished::Success));
    fields.insert("failed".into(), Value::from(finished == Finished::Failure));
    fields.insert("skipped".into(), Value::from(finished == Finished::Skipped));
    Value::Object(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(src: &str, steps: &[(&str, Finished, Value)]) -> Result<bool, String> {
        let params = json!({"threshold": 0.05}).as_object().unwrap().clone();
        Condition::parse(src)?.evaluate(&params, |name| {
            steps
                .iter()
                .find(|(id, ..)| *id == name)
                .map(|(_, f, out)| Binding::Step(*f, Some(out)))
                .or_else(|| (name == "error_rate").then(|| Binding::Value(0.2.into())))
        })
    }

    #[test]
    fn the_seed_condition() {
        let src = "quality_check.success && security_scan.passed";
        let ok = [
            ("quality_check", Finished::Success, json!({})),
            ("security_scan", Finished::Success, json!({"passed": true})),
        ];
        assert_eq!(eval(src, &ok), Ok(true));
        let failed_scan = [
            ("quality_check", Finished::Success, json!({})),
            ("security_scan", Finished::Success, json!({"passed": false})),
        ];
        assert_eq!(eval(src, &failed_scan), Ok(false));
    }

    #[test]
    fn status_fields_comparisons_and_params() {
        let steps = [(
            "m",
            Finished::Skipped,
            json!({"error_rate": 0.2, "status": "ignored"}),
        )];
        assert_eq!(eval("m.skipped && m.status == 'skipped'", &steps), Ok(true));
        assert_eq!(eval("m.error_rate > params.threshold", &steps), Ok(true));
        assert_eq!(
            eval("!m.failed || m.output.error_rate < 0.1", &steps),
            Ok(true)
        );
    }

    #[test]
    fn faults_are_named() {
        let steps = [("m", Finished::Success, json!({}))];
        assert!(eval("m.passed", &steps).unwrap_err().contains("passed"));
        assert!(
            eval("m.status", &steps)
                .unwrap_err()
                .contains("not true or false")
        );
        assert!(
            eval("other.success", &steps)
                .unwrap_err()
                .contains("`other`")
        );
        assert!(Condition::parse("m.success &&").is_err());
    }

    #[test]
    fn variables_are_the_top_level_names() {
        let c = Condition::parse("a.success && b.x > params.y").unwrap();
        let vars: Vec<_> = c.variables().into_iter().collect();
        assert_eq!(vars, ["a", "b", "params"]);
    }
}
