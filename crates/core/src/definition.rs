//! The workflow definition format, as users write it in YAML or JSON.
//!
//! Parsing only checks shape (unknown fields, wrong types, YAML syntax); the rules that span
//! steps (ids, dependencies, cycles, conditions) are checked when a definition is compiled into a
//! [`crate::Plan`].

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::duration::UserDuration;
use crate::retry::Backoff;

/// A workflow definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    #[serde(
        default,
        deserialize_with = "version_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Default run params; params given at submission override them key by key.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    pub steps: Vec<StepDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_handling: Option<ErrorHandling>,
    /// When the definition runs by itself, once registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::schedule::ScheduleSpec>,
    /// How long a run may take, from its start; past it, its unfinished steps end, its failure
    /// handlers run and it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<UserDuration>,
    /// Whether its runs' steps go to workers ahead of normal ones (a submission may say
    /// otherwise for its run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// How soon a run's tasks are taken by workers: `high` ones before any `normal` one waiting.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::High => "high",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "normal" => Some(Self::Normal),
            "high" => Some(Self::High),
            _ => None,
        }
    }
}

/// One step as written. `agent` and `action` are optional here so that validation can name the
/// step that lacks them; `notify` is only meaningful in `error_handling.on_failure`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// Instead of an agent: the registered definition this step runs as a run of its own (a
    /// sub-workflow), with `params` as its params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// With `workflow`: the revision (or `version:`) to run; the latest at dispatch when unset.
    #[serde(
        default,
        deserialize_with = "version_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// Replaces the implicit edge to the previous step; `[]` starts the step at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<String>>,
    /// Sub-steps that start together with this step; the step is done when all of them are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parallel: Vec<StepDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// With `condition` and no agent: the steps that run, one after the other, when the condition
    /// holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<StepDef>,
    /// The steps that run instead when the condition does not hold.
    #[serde(default, rename = "else", skip_serializing_if = "Vec::is_empty")]
    pub otherwise: Vec<StepDef>,
    /// Conditions over the step's `output` (and `params`) that a result claiming success must
    /// meet to count as one; one that does not is a failed attempt, retried by the policy.
    /// A string or a list of strings.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub expect: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// How long one attempt may take, from its dispatch; a late attempt fails and is retried by
    /// the step's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<UserDuration>,
    /// A `${{ … }}` template giving a list: the step runs once per item, each instance reading
    /// `${{ item }}` and `${{ index }}` in its params; its output is the list of their outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// At most this many instances of a `for_each` step run at once (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<usize>,
    /// How long the worker running an attempt may go without a heartbeat before the attempt is
    /// taken as lost and retried (the coordinator's lease when unset). Unless its `timeout` is
    /// short, its workers acknowledge the task once it has started, so the step may run longer
    /// than RabbitMQ's consumer timeout (see `Node::acks_early`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout: Option<UserDuration>,
    /// How long a dispatched attempt may wait for a worker to start it; past that it fails
    /// ("no worker of agent X started the step within …") and is retried by the step's policy.
    /// The coordinator's default when unset (none unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_to_start: Option<UserDuration>,
    /// The labels a worker must have to run the step's attempts (its fallback's go to any
    /// worker of the fallback's agent): `{gpu: true, region: eu}`. Values may be written as
    /// strings, booleans or numbers; they are compared as text.
    #[serde(
        default,
        deserialize_with = "label_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// Strike 2: what runs instead once the step's retries are exhausted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<CallDef>,
    /// What undoes the step once it has succeeded, run when its run is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<CallDef>,
    /// Strike 3: the notify channel told when the fallback (or, without one, the step) fails
    /// too; the step then waits for a person instead of failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate: Option<String>,
}

/// An agent call a step makes besides its own, with attempts and a retry policy of its own: its
/// alternative (`fallback:`) or its undoing (`compensate:`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// Unset fields fall back, for a fallback, to the step's retry settings, then to the
    /// workflow's; for a compensation, to the workflow's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// How long one attempt may take; for a fallback, the step's timeout when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<UserDuration>,
}

/// Retry settings as written; unset fields fall back to the workflow's default, then to
/// [`crate::retry::RetryPolicy::default`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<UserDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<UserDuration>,
    /// Fraction of each delay (0 to 1) that is randomised downwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// Workflow-wide error handling.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorHandling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Steps that run when the run fails: agent/action steps or `notify: NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_failure: Vec<StepDef>,
    /// When the run fails (after its `on_failure` handlers): run the `compensate:` of every step
    /// that succeeded, the last to succeed first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
}

/// Why a definition could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("YAML error at line {line}, column {column}: {message}")]
    Yaml {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("YAML error: {0}")]
    YamlNoLocation(String),
    #[error("JSON error at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("invalid definition: {0}")]
    Shape(String),
}

impl Definition {
    /// Parses YAML (JSON is YAML too, so this also reads JSON text).
    pub fn from_yaml(text: &str) -> Result<Self, DefinitionError> {
        check_flow_nesting(text)?;
        serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
            Some(loc) => DefinitionError::Yaml {
                line: loc.line(),
                column: loc.column(),
                message: strip_location(&e.to_string()),
            },
            None => DefinitionError::YamlNoLocation(e.to_string()),
        })
    }

    /// Parses JSON text.
    pub fn from_json(text: &str) -> Result<Self, DefinitionError> {
        serde_json::from_str(text).map_err(|e| DefinitionError::Json {
            line: e.line(),
            column: e.column(),
            message: strip_location(&e.to_string()),
        })
    }

    /// Reads a definition already parsed as a JSON value (the API's `definition` field).
    pub fn from_value(value: Value) -> Result<Self, DefinitionError> {
        serde_json::from_value(value).map_err(|e| DefinitionError::Shape(e.to_string()))
    }
}

/// The deepest nesting of YAML flow collections (`[ ]`, `{ }`) read; serde_yaml_ng refuses
/// more than 128 levels anyway, but only after a scan that costs the square of the depth
/// (a 1 MiB document of nested `{"a": ` took minutes), so deeper text is refused first.
pub const MAX_FLOW_NESTING: usize = 256;

/// Refuses text whose brackets nest deeper than [`MAX_FLOW_NESTING`], naming where. Brackets
/// inside strings count too: a string would need hundreds unclosed to be refused.
fn check_flow_nesting(text: &str) -> Result<(), DefinitionError> {
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        for (column, c) in line.chars().enumerate() {
            match c {
                '[' | '{' => depth += 1,
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth > MAX_FLOW_NESTING {
                return Err(DefinitionError::Yaml {
                    line: n + 1,
                    column: column + 1,
                    message: format!("brackets nest more than {MAX_FLOW_NESTING} deep"),
                });
            }
        }
    }
    Ok(())
}

/// serde_yaml_ng and serde_json append " at line X column Y"; we report the location ourselves.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// `version: 1.0.0` is a string in YAML but `version: 2` is a number; both name a version.
fn version_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(serde::de::Error::custom(format!(
                "version must be a string or a number, not {other}"
            )));
        }
    })
}

/// Labels whose values are strings, booleans or numbers, as text.
fn label_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    BTreeMap::<String, Value>::deserialize(deserializer)?
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key, s)),
            Value::Bool(b) => Ok((key, b.to_string())),
            Value::Number(n) => Ok((key, n.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "label `{key}` must be a string, a boolean or a number, not {other}"
            ))),
        })
        .collect()
}

/// A string or a list of strings, as a list.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    OneOrMany::deserialize(deserializer)
        .map(|v| match v {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(list) => list,
        })
        .map_err(|_| serde::de::Error::custom("expect must be a string or a list of strings"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_example() {
        let def = Definition::from_yaml(include_str!("../../../examples/workflow.yml")).unwrap();
        assert_eq!(def.name, "Complete Project Build");
        assert_eq!(def.version.as_deref(), Some("1.0.0"));
        assert_eq!(def.steps.len(), 4);
        assert_eq!(def.steps[2].parallel.len(), 2);
        let eh = def.error_handling.unwrap();
        assert_eq!(eh.retry.unwrap().max_attempts, Some(3));
        assert_eq!(eh.on_failure[1].notify.as_deref(), Some("slack"));
    }

    #[test]
    fn yaml_syntax_errors_name_line_and_column() {
        let err =
            Definition::from_yaml("name: x\nsteps:\n  - agent: a\n    action: [b\n").unwrap_err();
        match err {
            DefinitionError::Yaml { line, .. } => assert!(line >= 4, "{err}"),
            other => panic!("expected a located YAML error, got {other}"),
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = Definition::from_yaml("name: x\nsteps:\n  - agent: a\n    acton: b\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `acton`"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn json_reads_the_same_shape() {
        let def = Definition::from_json(
            r#"{"name":"j","version":2,"steps":[{"agent":"a","action":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(def.version.as_deref(), Some("2"));
        assert_eq!(def.steps[0].action.as_deref(), Some("b"));
    }
}
