//! The validator and plan compiler: any definition that parses compiles or is refused with the
//! faults found.
#![no_main]

use flotilla_core::{Definition, Plan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(definition) = Definition::from_yaml(text) {
        let _ = Plan::compile(&definition);
    }
});
