//! The template renderer: any string of params is checked, and one that passes renders to
//! params or an error, as a whole value, spliced into text, and as a `for_each` list.
#![no_main]

use flotilla_core::template;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fuzz_target!(|text: &str| {
    let run = json!({"n": 3, "s": "text", "l": [1, 2, 3]});
    let run = run.as_object().unwrap();
    let steps = || {
        let steps =
            json!({"build": {"output": {"artifact": "a.tar", "l": [1, 2]}, "status": "success"}});
        steps.as_object().unwrap().clone()
    };
    let mut params = Map::new();
    params.insert("v".into(), Value::String(text.to_owned()));
    params.insert("nested".into(), json!([{"w": text}]));
    if template::check(&params, true).is_ok() {
        let _ = template::render(&params, run, steps(), Some((&json!({"k": 1}), 0)));
    }
    let _ = template::render_text(text, run, steps());
});
