//! `condition:` expressions, in CEL (the Common Expression Language).
//!
//! Each step that finished before the condition's step is a variable: `<id>.success`,
//! `<id>.failed`, `<id>.skipped`, `<id>.status` describe how it ended, `<id>.output` is its whole
//! JSON output, and `<id>.<field>` reads a field of that output (the four reserved names win over
//! output fields of the same name). `params` holds the run's params.
//!
//! A step's `expect:` conditions use the same language over its own result: `output` is the
//! output its attempt reported, `params` the run's params (see [`check_expectations`]).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The variable that holds the run's params.
pub const PARAMS: &str = "params";

/// The variable that holds, in an `expect:` condition, the output the attempt reported.
pub const OUTPUT: &str = "output";

/// How the error of an attempt that claimed success but failed its step's `expect` begins.
pub const EXPECTATION_FAILED: &str = "expectation failed: ";

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
    /// Parses a condition; the error names the bound it passes (see [`crate::expression`]) or
    /// carries the parser's message with a caret under the fault.
    pub fn parse(source: &str) -> Result<Self, String> {
        let program = crate::expression::compile(source)?;
        if program
            .references()
            .variables()
            .contains(&crate::template::SECRETS)
        {
            return Err(format!(
                "reads `{}`: secrets may be read only in step params, as `${{{{ {}.NAME }}}}`, where the worker resolves them",
                crate::template::SECRETS,
                crate::template::SECRETS
            ));
        }
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
        match crate::expression::execute(&self.program, &ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "`{}` gives {other:?}, not true or false",
                self.source
            )),
            Err(e) => Err(format!("`{}` cannot be evaluated: {e}", self.source)),
        }
    }
}

/// Parses an `expect:` condition, which may read only `output` and `params`.
pub fn parse_expectation(source: &str) -> Result<Condition, String> {
    let condition = Condition::parse(source)?;
    match condition
        .variables()
        .into_iter()
        .find(|v| v != OUTPUT && v != PARAMS)
    {
        Some(other) => Err(format!(
            "reads `{other}`: an expectation may read only `{OUTPUT}` (the step's output) and `{PARAMS}`"
        )),
        None => Ok(condition),
    }
}

/// Checks an attempt's output against its step's `expect:` conditions, in order. The first that
/// does not hold, or cannot be evaluated (a missing field), is the error, which starts with
/// [`EXPECTATION_FAILED`] and names the expression and the output fields it read.
pub fn check_expectations(
    expect: &[Condition],
    params: &Map<String, Value>,
    output: &Value,
) -> Result<(), String> {
    for condition in expect {
        let held = condition.evaluate(params, |name| {
            (name == OUTPUT).then(|| Binding::Value(output.clone()))
        });
        match held {
            Ok(true) => {}
            Ok(false) => {
                let read = fields_read(condition.source(), output);
                return Err(if read.is_empty() {
                    format!("{EXPECTATION_FAILED}{}", condition.source())
                } else {
                    format!("{EXPECTATION_FAILED}{} ({read})", condition.source())
                });
            }
            Err(e) => return Err(format!("{EXPECTATION_FAILED}{e}")),
        }
    }
    Ok(())
}

/// Whether an attempt's error says it claimed success but failed its step's `expect`.
pub fn is_expectation_failure(error: &str) -> bool {
    error.starts_with(EXPECTATION_FAILED)
}

/// The top-level fields of `output` that `source` reads as `output.<field>`, with their values:
/// `output.coverage was 0.7, output.tests_failed was 2`.
fn fields_read(source: &str, output: &Value) -> String {
    const SHOWN: usize = 80;
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let prefix = format!("{OUTPUT}.");
    let mut fields: Vec<&str> = Vec::new();
    for (at, _) in source.match_indices(&prefix) {
        let before = source[..at].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == '.') {
            continue;
        }
        let rest = &source[at + prefix.len()..];
        let field = &rest[..rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len())];
        if !field.is_empty() && !fields.contains(&field) {
            fields.push(field);
        }
    }
    fields
        .iter()
        .map(|field| match output.get(field) {
            Some(value) => {
                let mut shown = value.to_string();
                if shown.len() > SHOWN {
                    let end = (0..=SHOWN).rev().find(|&i| shown.is_char_boundary(i));
                    shown.truncate(end.unwrap_or(0));
                    shown.push('…');
                }
                format!("{OUTPUT}.{field} was {shown}")
            }
            None => format!("{OUTPUT}.{field} is missing"),
        })
        .collect::<Vec<_>>()
        .join(", ")
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

    fn expect(sources: &[&str]) -> Vec<Condition> {
        sources
            .iter()
            .map(|s| parse_expectation(s).unwrap())
            .collect()
    }

    #[test]
    fn expectations_name_the_one_that_failed_and_what_it_read() {
        let params = json!({"min": 0.85}).as_object().unwrap().clone();
        let checks = expect(&["output.tests_failed == 0", "output.coverage >= params.min"]);
        assert_eq!(
            check_expectations(
                &checks,
                &params,
                &json!({"tests_failed": 0, "coverage": 0.9})
            ),
            Ok(())
        );
        let err = check_expectations(
            &checks,
            &params,
            &json!({"tests_failed": 0, "coverage": 0.7}),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "expectation failed: output.coverage >= params.min (output.coverage was 0.7)"
        );
        assert!(is_expectation_failure(&err));
        let err = check_expectations(
            &checks,
            &params,
            &json!({"tests_failed": 2, "coverage": 0.7}),
        )
        .unwrap_err();
        assert!(
            err.contains("output.tests_failed == 0 (output.tests_failed was 2)"),
            "{err}"
        );
    }

    #[test]
    fn an_expectation_that_cannot_be_evaluated_fails_naming_why() {
        let checks = expect(&["output.coverage >= 0.85"]);
        let err = check_expectations(&checks, &Map::new(), &json!({"tests": 3})).unwrap_err();
        assert!(is_expectation_failure(&err), "{err}");
        assert!(
            err.contains("`output.coverage >= 0.85` cannot be evaluated"),
            "{err}"
        );
        let err = check_expectations(
            &expect(&["output.tests"]),
            &Map::new(),
            &json!({"tests": 3}),
        )
        .unwrap_err();
        assert!(err.contains("not true or false"), "{err}");
    }

    #[test]
    fn expectations_read_only_output_and_params() {
        let err = parse_expectation("build.success && output.ok").unwrap_err();
        assert!(err.contains("reads `build`"), "{err}");
        assert!(parse_expectation("output.ok &&").is_err());
        assert!(parse_expectation("size(output.items) > params.n").is_ok());
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(100);
        let shown = fields_read(
            "output.name == 'x' && output.name != 'y'",
            &json!({"name": long}),
        );
        assert!(shown.starts_with("output.name was \"é"), "{shown}");
        assert!(shown.ends_with('…'), "{shown}");
        assert_eq!(shown.matches("output.name").count(), 1, "{shown}");
        assert_eq!(
            fields_read("output.gone", &json!({})),
            "output.gone is missing"
        );
    }

    proptest::proptest! {
        /// An expectation comparing a number with a threshold holds exactly when the comparison
        /// does, and its failure names the value read.
        #[test]
        fn a_threshold_holds_exactly_when_the_value_meets_it(
            value in -1_000i64..1_000,
            threshold in -1_000i64..1_000,
        ) {
            let checks = expect(&[&format!("output.n >= {threshold}")]);
            let result = check_expectations(&checks, &Map::new(), &json!({"n": value}));
            if value >= threshold {
                proptest::prop_assert_eq!(result, Ok(()));
            } else {
                let err = result.unwrap_err();
                proptest::prop_assert!(err.ends_with(&format!("(output.n was {value})")), "{}", err);
            }
        }
    }
}
