//! A step's params, checked against the agent's config before anything runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::duration::UserDuration;
use flotilla_worker::HandlerError;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Config;

/// What to make of stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parse {
    /// Kept as text in `stdout`.
    #[default]
    Text,
    /// Also parsed as JSON into `json`; output that is not JSON fails the step.
    Json,
}

/// The params as written; `command` is checked by hand for a clearer error than serde's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    command: Value,
    #[serde(default)]
    shell: bool,
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<UserDuration>,
    #[serde(default)]
    parse: Parse,
}

/// A command the agent may run.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub argv: Vec<String>,
    /// Canonical, under the agent's root.
    pub cwd: PathBuf,
    /// Set on top of the variables the agent passes through.
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub parse: Parse,
}

impl Request {
    /// Reads and checks a step's params. Every fault is fatal: another attempt would repeat it.
    pub fn from_params(params: &Map<String, Value>, config: &Config) -> Result<Self, HandlerError> {
        let params: Params = serde_json::from_value(Value::Object(params.clone()))
            .map_err(|e| HandlerError::fatal(format!("shell: invalid params: {e}")))?;
        let argv = argv(&params.command, params.shell, config).map_err(HandlerError::fatal)?;
        let cwd = confine(&config.root, params.cwd.as_deref()).map_err(HandlerError::fatal)?;
        let timeout = params.timeout.map_or(config.timeout, |t| t.0);
        if timeout.is_zero() {
            return Err(HandlerError::fatal("shell: timeout must be longer than 0"));
        }
        Ok(Self {
            argv,
            cwd,
            env: params.env,
            timeout,
            parse: params.parse,
        })
    }

    /// The command as a user would type it, for errors and logs.
    pub fn display(&self) -> String {
        let line = self.argv.join(" ");
        match line.char_indices().nth(120) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line,
        }
    }
}

/// The argv to execute: the array as given, or `sh -c LINE` when the step asks for a shell and
/// the config allows one. The program must be on the allow-list.
fn argv(command: &Value, shell: bool, config: &Config) -> Result<Vec<String>, String> {
    match (command, shell) {
        (Value::String(line), true) => {
            if !config.allow_shell {
                return Err("shell: `shell: true` is not allowed by this agent's config (allow_shell)".into());
            }
            if line.trim().is_empty() {
                return Err("shell: `command` is empty".into());
            }
            Ok(vec!["sh".into(), "-c".into(), line.clone()])
        }
        (Value::String(_), false) => Err(
            "shell: `command` is a string: give an argv array such as [\"cargo\", \"build\"], or `shell: true` to run it with sh -c"
                .into(),
        ),
        (Value::Array(items), false) => {
            let argv = items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(format!(
                        "shell: every argument of `command` must be a string, not {other}"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let program = argv
                .first()
                .filter(|p| !p.is_empty())
                .ok_or("shell: `command` is empty: its first element names the program")?;
            if !allowed(program, &config.allow) {
                return Err(format!(
                    "shell: program `{program}` is not in this agent's allow-list ({})",
                    if config.allow.is_empty() {
                        "empty".to_string()
                    } else {
                        config.allow.join(", ")
                    }
                ));
            }
            Ok(argv)
        }
        (Value::Array(_), true) => {
            Err("shell: with `shell: true`, `command` is one string for sh -c".into())
        }
        (other, _) => Err(format!(
            "shell: `command` must be an argv array of strings, not {other}"
        )),
    }
}

/// Whether `program` (argv[0]) is allowed: a name without `/` matches an entry equal to it; a
/// path matches only an entry that is that same path, so `./cargo` is not `cargo`.
pub fn allowed(program: &str, allow: &[String]) -> bool {
    allow.iter().any(|entry| entry == program)
}

/// The working directory: `cwd` relative to `root` (or absolute), which must exist and lie
/// under `root` once symbolic links and `..` are resolved.
fn confine(root: &Path, cwd: Option<&Path>) -> Result<PathBuf, String> {
    let Some(cwd) = cwd else {
        return Ok(root.to_path_buf());
    };
    let joined = root.join(cwd);
    let resolved = joined
        .canonicalize()
        .map_err(|e| format!("shell: cwd `{}` is not usable: {e}", cwd.display()))?;
    if !resolved.starts_with(root) {
        return Err(format!(
            "shell: cwd `{}` is outside the agent's root {}",
            cwd.display(),
            root.display()
        ));
    }
    if !resolved.is_dir() {
        return Err(format!("shell: cwd `{}` is not a directory", cwd.display()));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(allow: &[&str], allow_shell: bool) -> Config {
        Config {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            allow_shell,
            root: std::env::temp_dir().canonicalize().unwrap(),
            max_output_bytes: 1024,
            timeout: Duration::from_secs(5),
            pass_env: vec![],
        }
    }

    fn request(params: Value, config: &Config) -> Result<Request, HandlerError> {
        Request::from_params(params.as_object().unwrap(), config)
    }

    fn refusal(params: Value, config: &Config) -> String {
        let error = request(params, config).unwrap_err();
        assert!(!error.retryable, "{error}");
        error.message
    }

    #[test]
    fn an_allowed_argv_is_taken_with_its_settings() {
        let config = config(&["cargo"], false);
        let request = request(
            json!({"command": ["cargo", "build", "-j", 2], "env": {"RUST_LOG": "debug"},
                   "timeout": "2m", "parse": "json"}),
            &config,
        )
        .unwrap();
        assert_eq!(request.argv, ["cargo", "build", "-j", "2"]);
        assert_eq!(request.cwd, config.root);
        assert_eq!(request.env["RUST_LOG"], "debug");
        assert_eq!(request.timeout, Duration::from_secs(120));
        assert_eq!(request.parse, Parse::Json);
        assert_eq!(request.display(), "cargo build -j 2");
    }

    #[test]
    fn programs_outside_the_allow_list_are_refused_by_name() {
        let config = config(&["cargo", "/usr/bin/git"], false);
        assert_eq!(
            refusal(json!({"command": ["rm", "-rf", "/"]}), &config),
            "shell: program `rm` is not in this agent's allow-list (cargo, /usr/bin/git)"
        );
        // A path is not the bare name, and a bare name is not the path.
        assert!(refusal(json!({"command": ["./cargo"]}), &config).contains("`./cargo`"));
        assert!(refusal(json!({"command": ["git"]}), &config).contains("`git`"));
        assert!(request(json!({"command": ["/usr/bin/git", "status"]}), &config).is_ok());
    }

    #[test]
    fn a_shell_string_needs_the_config_to_allow_it() {
        let strict = config(&["sh"], false);
        assert!(
            refusal(json!({"command": "echo hi", "shell": true}), &strict)
                .contains("not allowed by this agent's config (allow_shell)")
        );
        assert!(refusal(json!({"command": "echo hi"}), &strict).contains("`command` is a string"));
        let open = config(&[], true);
        let request = request(json!({"command": "echo hi | wc", "shell": true}), &open).unwrap();
        assert_eq!(request.argv, ["sh", "-c", "echo hi | wc"]);
        assert!(refusal(json!({"command": ["echo"], "shell": true}), &open).contains("one string"));
    }

    #[test]
    fn malformed_commands_and_params_are_refused() {
        let config = config(&["cargo"], false);
        for (params, expected) in [
            (json!({"command": []}), "`command` is empty"),
            (json!({"command": [""]}), "`command` is empty"),
            (
                json!({"command": ["cargo", null]}),
                "must be a string, not null",
            ),
            (json!({"command": 7}), "must be an argv array"),
            (json!({"command": ["cargo"], "timeout": 0}), "longer than 0"),
            (
                json!({"command": ["cargo"], "env": {"N": 1}}),
                "invalid params",
            ),
            (
                json!({"command": ["cargo"], "parse": "xml"}),
                "unknown variant `xml`",
            ),
            (
                json!({"command": ["cargo"], "cmd": 1}),
                "unknown field `cmd`",
            ),
            (json!({}), "missing field `command`"),
        ] {
            let message = refusal(params.clone(), &config);
            assert!(message.contains(expected), "{params}: {message}");
        }
    }

    #[test]
    fn the_working_directory_stays_under_the_root() {
        let root = std::env::temp_dir().join(format!("shell-confine-{}", std::process::id()));
        std::fs::create_dir_all(root.join("project/src")).unwrap();
        let mut config = config(&["cargo"], false);
        config.root = root.canonicalize().unwrap();
        let cwd = |cwd: &str| request(json!({"command": ["cargo"], "cwd": cwd}), &config);
        assert_eq!(
            cwd("project/src").unwrap().cwd,
            config.root.join("project/src")
        );
        assert_eq!(cwd("project/..").unwrap().cwd, config.root);
        for outside in ["..", "project/../..", "/etc"] {
            let message = cwd(outside).unwrap_err().message;
            assert!(
                message.contains("is outside the agent's root"),
                "{outside}: {message}"
            );
        }
        assert!(cwd("missing").unwrap_err().message.contains("not usable"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
