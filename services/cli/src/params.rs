//! `--param KEY=VALUE`.

use serde_json::{Map, Value};

/// One `--param`.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub key: String,
    pub value: Value,
}

/// Reads `KEY=VALUE`. The value is JSON when it parses as JSON, so that numbers, booleans, lists
/// and objects keep their type; anything else (`name=my-app`) is taken as a plain string. To pass
/// a string that looks like JSON, quote it as JSON: `version='"2"'`.
pub fn parse_param(arg: &str) -> Result<Param, String> {
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(format!("`{arg}` is not KEY=VALUE"));
    };
    if key.is_empty() {
        return Err(format!("`{arg}` has no key before `=`"));
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    Ok(Param {
        key: key.to_string(),
        value,
    })
}

/// The params as a JSON object; a key given twice is refused rather than one value silently
/// winning.
pub fn collect(params: Vec<Param>) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    for Param { key, value } in params {
        if map.contains_key(&key) {
            return Err(format!("--param `{key}` is given more than once"));
        }
        map.insert(key, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn value(arg: &str) -> Value {
        parse_param(arg).unwrap().value
    }

    #[test]
    fn json_values_keep_their_type() {
        assert_eq!(value("n=3"), json!(3));
        assert_eq!(value("ratio=0.5"), json!(0.5));
        assert_eq!(value("flag=true"), json!(true));
        assert_eq!(value("nothing=null"), json!(null));
        assert_eq!(value(r#"obj={"a":1}"#), json!({"a": 1}));
        assert_eq!(value("list=[1,\"x\"]"), json!([1, "x"]));
        assert_eq!(value(r#"quoted="2""#), json!("2"));
    }

    #[test]
    fn anything_else_is_a_string() {
        assert_eq!(value("name=my-app"), json!("my-app"));
        assert_eq!(value("empty="), json!(""));
        assert_eq!(value("broken={\"a\":"), json!("{\"a\":"));
        assert_eq!(value("url=http://x/?a=b"), json!("http://x/?a=b"));
    }

    #[test]
    fn the_key_ends_at_the_first_equals_sign() {
        assert_eq!(
            parse_param("expr=a=b").unwrap(),
            Param {
                key: "expr".into(),
                value: json!("a=b"),
            }
        );
    }

    #[test]
    fn malformed_params_are_refused() {
        assert!(parse_param("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_param("=3").unwrap_err().contains("no key"));
    }

    #[test]
    fn params_are_collected_into_an_object() {
        let params = ["a=1", "b=x"].map(|p| parse_param(p).unwrap()).to_vec();
        assert_eq!(
            Value::Object(collect(params).unwrap()),
            json!({"a": 1, "b": "x"})
        );
    }

    #[test]
    fn a_repeated_key_is_refused() {
        let params = ["a=1", "a=2"].map(|p| parse_param(p).unwrap()).to_vec();
        assert!(collect(params).unwrap_err().contains("`a`"));
    }
}
