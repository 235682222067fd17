//! Who the CLI says is acting: the `Flotilla-Actor` header of the operator commands, recorded in
//! the run's history.

use flotilla_api_model::MAX_ACTOR_CHARS;

/// What stands in for a user or host name that cannot be found.
const UNKNOWN: &str = "unknown";

/// `<$USER>@<hostname>`, each `unknown` when it cannot be found.
pub fn local() -> String {
    compose(std::env::var("USER").ok().as_deref(), hostname().as_deref())
}

/// `HOSTNAME` when the environment has it (so that a user or a container can say), else the
/// first line of `/etc/hostname`.
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| {
            let text = std::fs::read_to_string("/etc/hostname").ok()?;
            text.lines().next().map(str::to_string)
        })
}

/// `user@host`, made to pass the coordinator's rule for actors
/// ([`check_actor`](flotilla_api_model::check_actor)): an operator stopping a run in a hurry must
/// not be held up by a space or an accent in their user name, so every character that is not
/// visible ASCII becomes `_`, and the whole is cut to the longest actor accepted.
fn compose(user: Option<&str>, host: Option<&str>) -> String {
    let part = |name: Option<&str>| {
        name.map(str::trim)
            .filter(|name| !name.is_empty())
            .unwrap_or(UNKNOWN)
            .to_string()
    };
    format!("{}@{}", part(user), part(host))
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(MAX_ACTOR_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use flotilla_api_model::check_actor;

    use super::*;

    #[test]
    fn the_actor_is_user_at_host() {
        assert_eq!(compose(Some("alice"), Some("build-box")), "alice@build-box");
        assert_eq!(
            compose(Some("alice"), Some("build-box\n")),
            "alice@build-box"
        );
    }

    #[test]
    fn what_is_missing_is_unknown() {
        assert_eq!(compose(None, Some("build-box")), "unknown@build-box");
        assert_eq!(compose(Some(""), Some(" ")), "unknown@unknown");
        assert_eq!(compose(Some("alice"), None), "alice@unknown");
    }

    #[test]
    fn any_name_becomes_an_actor_the_coordinator_accepts() {
        let cases = [
            (compose(Some("jane doe"), Some("box")), "jane_doe@box"),
            (compose(Some("josé"), Some("box")), "jos_@box"),
            (compose(Some("tab\there"), Some("box")), "tab_here@box"),
        ];
        for (actor, expected) in cases {
            assert_eq!(actor, expected);
            assert_eq!(check_actor(&actor), Ok(()), "{actor:?}");
        }
        let long = compose(Some(&"u".repeat(300)), Some("box"));
        assert_eq!(long.len(), MAX_ACTOR_CHARS);
        assert_eq!(check_actor(&long), Ok(()));
    }
}
