//! The definition parser: any text, as YAML and as JSON, answers a definition or an error.
#![no_main]

use flotilla_core::Definition;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = Definition::from_yaml(text);
    let _ = Definition::from_json(text);
});
