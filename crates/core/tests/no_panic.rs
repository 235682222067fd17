//! No input makes the definition parser, the validator, the condition evaluator or the template
//! renderer panic or overflow its stack: each answers a value or an error. Test threads have a
//! 2 MiB stack, as tokio's workers do, so a recursion the bounds let through would abort here.

use flotilla_core::condition::{Binding, Condition, Finished};
use flotilla_core::{Definition, Plan, template};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Text made of the pieces CEL and YAML are built from, so that the parsers get past their
/// first character.
fn expression() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("(".to_string()),
        Just(")".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("params.".to_string()),
        Just("build.".to_string()),
        Just("steps.build.output".to_string()),
        Just(".map(x, ".to_string()),
        Just(".filter(y, ".to_string()),
        Just(" + ".to_string()),
        Just(" == ".to_string()),
        Just(" ? ".to_string()),
        Just(" : ".to_string()),
        Just(" && ".to_string()),
        Just("!".to_string()),
        Just("-".to_string()),
        Just("\"".to_string()),
        Just("'".to_string()),
        Just("r\"".to_string()),
        Just("\\".to_string()),
        Just(", ".to_string()),
        Just("1".to_string()),
        Just("x".to_string()),
        Just("success".to_string()),
        Just("size(".to_string()),
        "[a-z0-9_]{1,4}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..64).prop_map(|pieces| pieces.concat())
}

/// The same piece repeated: deep nesting, long operator chains.
fn deep() -> impl Strategy<Value = String> {
    let open = prop_oneof![
        Just(("(", ")")),
        Just(("[", "]")),
        Just(("{1: ", "}")),
        Just(("size(", ")")),
        Just(("!", "")),
        Just(("-", "")),
        Just(("1 + ", "")),
        Just(("a[0]", "")),
        Just(("true ? 1 : ", "")),
        Just(("[1].map(x, ", ")")),
    ];
    (open, 1usize..3000)
        .prop_map(|((open, close), n)| format!("{}1{}", open.repeat(n), close.repeat(n)))
}

fn params() -> Map<String, Value> {
    json!({"a": [1, 2, 3], "s": "text", "n": 3})
        .as_object()
        .cloned()
        .unwrap()
}

fn steps() -> Map<String, Value> {
    json!({"build": {"output": {"artifact": "x", "list": [1, 2]}, "status": "success"}})
        .as_object()
        .cloned()
        .unwrap()
}

fn condition_runs(source: &str) {
    if let Ok(condition) = Condition::parse(source) {
        let output = json!({"artifact": "x", "list": [1, 2]});
        let _ = condition.evaluate(&params(), |name| {
            (name == "build").then_some(Binding::Step(Finished::Success, Some(&output)))
        });
    }
}

fn template_runs(source: &str) {
    let params_in =
        json!({"v": format!("${{{{ {source} }}}}"), "w": format!("a ${{{{ {source} }}}} b")})
            .as_object()
            .cloned()
            .unwrap();
    if template::check(&params_in, true).is_ok() {
        let _ = template::render(&params_in, &params(), steps(), Some((&json!(1), 0)));
    }
    let _ = template::render_text(source, &params(), steps());
}

fn definition_runs(text: &str) {
    for definition in [Definition::from_yaml(text), Definition::from_json(text)]
        .into_iter()
        .flatten()
    {
        let _ = Plan::compile(&definition);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn conditions_and_templates_never_panic(source in prop_oneof![expression(), deep()]) {
        condition_runs(&source);
        template_runs(&source);
    }

    #[test]
    fn definitions_never_panic(text in prop_oneof![expression(), deep(), any::<String>()]) {
        definition_runs(&text);
    }

    #[test]
    fn definitions_holding_any_condition_or_template_never_panic(source in prop_oneof![expression(), deep()]) {
        let yaml = serde_json::to_string(&json!({
            "name": "fuzzed",
            "steps": [
                {"id": "build", "agent": "a", "action": "b", "params": {"x": format!("${{{{ {source} }}}}")}},
                {"id": "ship", "agent": "a", "action": "b", "depends_on": ["build"], "condition": source},
            ]
        })).unwrap();
        definition_runs(&yaml);
    }
}

/// Nesting that YAML and JSON themselves carry, far past any bound, is refused at once (a
/// 1 MiB definition of nested flow mappings once kept the parser busy for minutes).
#[test]
fn deeply_nested_documents_are_refused_quickly_not_a_crash() {
    let started = std::time::Instant::now();
    for n in [100, 1_000, 300_000] {
        definition_runs(&format!("{}1{}", "[".repeat(n), "]".repeat(n)));
        definition_runs(&format!("{}1", "- ".repeat(n)));
        definition_runs(&format!("{}1{}", "{\"a\": ".repeat(n), "}".repeat(n)));
        let yaml = format!(
            "name: x\nsteps:\n  - {{id: a, agent: a, action: b, params: {{p: {}1{}}}}}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        definition_runs(&yaml);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let deep = format!("{}1{}", "{\"a\": ".repeat(300), "}".repeat(300));
    let refused = Definition::from_yaml(&deep).unwrap_err().to_string();
    assert_eq!(
        refused,
        "YAML error at line 1, column 1537: brackets nest more than 256 deep"
    );
}
