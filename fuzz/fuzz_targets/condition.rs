//! The condition evaluator: any expression parses or is refused, and one that parses evaluates
//! to a boolean or an error, over a finished step and the run's params.
#![no_main]

use flotilla_core::condition::{Binding, Condition, Finished};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|source: &str| {
    let Ok(condition) = Condition::parse(source) else {
        return;
    };
    let params = json!({"n": 3, "s": "text", "l": [1, 2, 3], "m": {"k": [true, null]}});
    let output = json!({"coverage": 0.9, "items": [1, "two", {"three": 3}]});
    let _ = condition.evaluate(params.as_object().unwrap(), |name| match name {
        "build" => Some(Binding::Step(Finished::Success, Some(&output))),
        "lint" => Some(Binding::Step(Finished::Failure, None)),
        _ => None,
    });
});
