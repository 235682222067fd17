//! The shell agent's configuration: what it may run, where, and within which limits. Layered:
//! defaults, then the YAML file of `--config`, then environment variables and flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::duration::UserDuration;
use serde::Deserialize;

/// Environment variables a command inherits from the agent unless `pass_env` says otherwise.
/// Everything else (the RabbitMQ URL, for one) stays out of the commands' reach.
pub const DEFAULT_PASS_ENV: [&str; 8] = [
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "CARGO_HOME",
    "RUSTUP_HOME",
];
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The agent's effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Programs a step may run: a bare name matches the program `argv[0]` names when it has no
    /// `/` (found on `PATH`); an entry with a `/` matches exactly that path.
    pub allow: Vec<String>,
    /// Whether a step may give `shell: true` and a command string for `sh -c`. The shell can run
    /// any program, so this trusts the definitions' authors with the allow-list.
    pub allow_shell: bool,
    /// Commands run in this directory or below it (canonical).
    pub root: PathBuf,
    /// What is kept of each of stdout and stderr.
    pub max_output_bytes: usize,
    /// A step's timeout when it gives none.
    pub timeout: Duration,
    /// Variables of the agent's own environment that commands inherit.
    pub pass_env: Vec<String>,
}

/// The YAML file: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub allow: Option<Vec<String>>,
    pub allow_shell: Option<bool>,
    pub root: Option<PathBuf>,
    pub max_output_bytes: Option<usize>,
    pub timeout: Option<UserDuration>,
    pub pass_env: Option<Vec<String>>,
}

impl File {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        serde_yaml_ng::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }

    /// Fields set in `over` replace those of `self`.
    pub fn overlay(self, over: File) -> File {
        File {
            allow: over.allow.or(self.allow),
            allow_shell: over.allow_shell.or(self.allow_shell),
            root: over.root.or(self.root),
            max_output_bytes: over.max_output_bytes.or(self.max_output_bytes),
            timeout: over.timeout.or(self.timeout),
            pass_env: over.pass_env.or(self.pass_env),
        }
    }

    /// Fills in the defaults and checks the result. The root defaults to the current directory.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let allow: Vec<String> = self
            .allow
            .unwrap_or_default()
            .into_iter()
            .map(|program| program.trim().to_string())
            .filter(|program| !program.is_empty())
            .collect();
        let allow_shell = self.allow_shell.unwrap_or(false);
        if allow.is_empty() && !allow_shell {
            anyhow::bail!(
                "the shell agent allows no program: list them in `allow` (config file), FLOTILLA_SHELL_ALLOW or --allow"
            );
        }
        let root = match self.root {
            Some(root) => root,
            None => std::env::current_dir()?,
        };
        // A root that is not there yet is made, as a working directory is by most tools.
        let root = std::fs::create_dir_all(&root)
            .and_then(|()| root.canonicalize())
            .map_err(|e| anyhow::anyhow!("root {} is not usable: {e}", root.display()))?;
        if !root.is_dir() {
            anyhow::bail!("root {} is not a directory", root.display());
        }
        let max_output_bytes = self.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
        if max_output_bytes == 0 {
            anyhow::bail!("max_output_bytes must be at least 1");
        }
        let timeout = self.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0);
        if timeout.is_zero() {
            anyhow::bail!("timeout must be longer than 0");
        }
        Ok(Config {
            allow,
            allow_shell,
            root,
            max_output_bytes,
            timeout,
            pass_env: self
                .pass_env
                .unwrap_or_else(|| DEFAULT_PASS_ENV.map(String::from).to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_environment_override_the_file() {
        let file: File = serde_yaml_ng::from_str(
            "allow: [cargo, sh]\nallow_shell: true\ntimeout: 2s\nmax_output_bytes: 10\n",
        )
        .unwrap();
        let config = file
            .overlay(File {
                allow: Some(vec!["echo".into(), " ".into()]),
                root: Some(std::env::temp_dir()),
                ..File::default()
            })
            .resolve()
            .unwrap();
        assert_eq!(config.allow, vec!["echo"]);
        assert!(config.allow_shell);
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!(config.max_output_bytes, 10);
        assert_eq!(config.root, std::env::temp_dir().canonicalize().unwrap());
        assert_eq!(config.pass_env, DEFAULT_PASS_ENV.map(String::from).to_vec());
    }

    #[test]
    fn an_empty_allow_list_is_refused() {
        let error = File::default().resolve().unwrap_err().to_string();
        assert!(error.contains("allows no program"), "{error}");
    }

    #[test]
    fn unknown_fields_and_roots_that_are_files_are_refused() {
        let error = serde_yaml_ng::from_str::<File>("allowed: [cargo]").unwrap_err();
        assert!(
            error.to_string().contains("unknown field `allowed`"),
            "{error}"
        );
        let file = std::env::temp_dir().join(format!("flotilla-shell-root-{}", std::process::id()));
        std::fs::write(&file, "not a directory").unwrap();
        let error = File {
            allow: Some(vec!["cargo".into()]),
            root: Some(file.join("below")),
            ..File::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(
            error.contains(&format!("root {}/below is not usable", file.display())),
            "{error}"
        );
    }

    #[test]
    fn a_missing_root_is_made() {
        let root = std::env::temp_dir()
            .join(format!("flotilla-shell-new-root-{}", std::process::id()))
            .join("builds");
        let config = File {
            allow: Some(vec!["cargo".into()]),
            root: Some(root.clone()),
            ..File::default()
        }
        .resolve()
        .unwrap();
        assert!(root.is_dir());
        assert_eq!(config.root, root.canonicalize().unwrap());
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }
}
