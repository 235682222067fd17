//! Greetings.

/// The greeting for `name`; the world's when it is empty.
pub fn greeting(name: &str) -> String {
    let name = name.trim();
    if name.is_empty() {
        "Hello, world!".to_string()
    } else {
        format!("Hello, {name}!")
    }
}

#[cfg(test)]
mod tests {
    use super::greeting;

    #[test]
    fn greets_by_name() {
        assert_eq!(greeting("Flotilla"), "Hello, Flotilla!");
    }

    #[test]
    fn greets_the_world_without_a_name() {
        assert_eq!(greeting("  "), "Hello, world!");
    }
}
