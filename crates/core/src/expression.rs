//! The one place CEL expressions (conditions, expectations, templates) are parsed and run, and
//! the bounds they are held to.
//!
//! CEL's parser and interpreter recurse over the expression: without a bound, a few dozen
//! nested brackets overflow a thread's stack (the process aborts; nothing can catch it), and
//! comprehensions nested in comprehensions cost the product of their lists. So, before parsing:
//! at most [`MAX_LENGTH`] bytes, [`MAX_NESTING`] brackets deep, [`MAX_OPERATORS`] operators, and
//! no comprehension (`map`, `filter`, `all`, `exists`, `exists_one`) inside another, which
//! keeps an evaluation linear in the data it reads. Parsing and evaluation run on a stack of
//! their own ([`STACK_BYTES`]), sized for the worst expression these bounds let through, so the
//! caller's stack does not matter.

use cel::{Context, ExecutionError, Program};

/// The longest expression accepted, in bytes.
pub const MAX_LENGTH: usize = 4_096;
/// The deepest nesting of brackets (`(`, `[`, `{`) accepted.
pub const MAX_NESTING: usize = 32;
/// The most operator symbols (`+ - * / % < > = ! ? [`, each character counted) one expression
/// may hold outside its string literals.
pub const MAX_OPERATORS: usize = 128;
/// The stack parsing and evaluation run on.
pub const STACK_BYTES: usize = 64 << 20;

const COMPREHENSIONS: [&str; 5] = ["map", "filter", "all", "exists", "exists_one"];

/// Parses `source` once it is within the bounds; the error names the bound or carries the
/// parser's message.
pub fn compile(source: &str) -> Result<Program, String> {
    check(source)?;
    stacker::grow(STACK_BYTES, || {
        Program::compile(source).map_err(|e| format!("does not parse: {e}"))
    })
}

/// Evaluates `program` on a stack of its own.
pub fn execute(program: &Program, ctx: &Context) -> Result<cel::Value, ExecutionError> {
    stacker::grow(STACK_BYTES, || program.execute(ctx))
}

/// Whether `value`, written as JSON, would take at most about `budget` bytes; stops counting
/// once over, so a value that shares one list many times costs no more than the budget.
pub fn fits(value: &cel::Value, budget: usize) -> bool {
    fn spend(value: &cel::Value, left: &mut usize) -> bool {
        let (cost, children): (usize, Option<Box<dyn Iterator<Item = &cel::Value> + '_>>) =
            match value {
                cel::Value::String(s) => (s.len() + 2, None),
                cel::Value::Bytes(b) => (b.len() + 2, None),
                cel::Value::List(items) => (items.len() + 2, Some(Box::new(items.iter()))),
                cel::Value::Map(map) => (
                    map.map
                        .keys()
                        .map(|k| k.to_string().len() + 4)
                        .sum::<usize>()
                        + 2,
                    Some(Box::new(map.map.values())),
                ),
                _ => (8, None),
            };
        let Some(rest) = left.checked_sub(cost) else {
            return false;
        };
        *left = rest;
        children.is_none_or(|mut children| children.all(|child| spend(child, left)))
    }
    let mut left = budget;
    spend(value, &mut left)
}

/// Holds `source` to the bounds before the parser sees it. Brackets count wherever they are
/// (a string full of them is refused, never an expression that hides them); operators count
/// outside string literals.
fn check(source: &str) -> Result<(), String> {
    if source.len() > MAX_LENGTH {
        return Err(format!(
            "is {} bytes long; at most {MAX_LENGTH} are allowed",
            source.len()
        ));
    }
    let bytes = source.as_bytes();
    // For each open bracket, whether it opened a comprehension's arguments.
    let mut open: Vec<bool> = Vec::new();
    let mut operators = 0;
    let mut quote: Option<(&[u8], bool)> = None;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if let Some((closing, raw)) = quote {
            if byte == b'\\' && !raw {
                i += 2;
                continue;
            }
            if bytes[i..].starts_with(closing) {
                quote = None;
                i += closing.len();
                continue;
            }
        } else if byte == b'"' || byte == b'\'' {
            let triple: &[u8] = if byte == b'"' { b"\"\"\"" } else { b"'''" };
            let closing = if bytes[i..].starts_with(triple) {
                triple
            } else {
                &bytes[i..=i]
            };
            let raw = i > 0 && matches!(bytes[i - 1], b'r' | b'R');
            quote = Some((closing, raw));
            i += closing.len();
            continue;
        } else if matches!(
            byte,
            b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'!' | b'?' | b'['
        ) {
            operators += 1;
            if operators > MAX_OPERATORS {
                return Err(format!(
                    "holds more than {MAX_OPERATORS} operator symbols; split it into simpler expressions"
                ));
            }
        }
        match byte {
            b'(' | b'[' | b'{' => {
                let comprehension =
                    byte == b'(' && quote.is_none() && opens_comprehension(&source[..i]);
                if comprehension && open.iter().any(|&c| c) {
                    return Err(
                        "nests a comprehension (map, filter, all, exists, exists_one) inside another, which may cost the product of their lists"
                            .into(),
                    );
                }
                open.push(comprehension);
                if open.len() > MAX_NESTING {
                    return Err(format!("nests brackets more than {MAX_NESTING} deep"));
                }
            }
            b')' | b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Whether the text before a `(` ends with `.map` (or another comprehension's name).
fn opens_comprehension(before: &str) -> bool {
    let before = before.trim_end();
    let name_start = before
        .char_indices()
        .rfind(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    COMPREHENSIONS.contains(&&before[name_start..])
        && before[..name_start].trim_end().ends_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_is_named_when_passed() {
        let long = format!("1 == {}", "1".repeat(MAX_LENGTH));
        assert!(compile(&long).unwrap_err().contains("at most 4096"));
        let deep = format!("{}1{}", "(".repeat(33), ")".repeat(33));
        assert!(compile(&deep).unwrap_err().contains("more than 32 deep"));
        let busy = format!("1{}", " + 1".repeat(MAX_OPERATORS + 1));
        assert!(compile(&busy).unwrap_err().contains("operator symbols"));
        let nested = "params.l.map(x, params.l.filter(y, y > x))";
        assert!(compile(nested).unwrap_err().contains("comprehension"));
        // Brackets in strings count; operators there do not.
        assert!(compile(&format!("\"{}\" == 'x'", "(".repeat(40))).is_err());
        assert!(compile(&format!("\"{}\" == 'x'", "-".repeat(400))).is_ok());
        // Side by side, comprehensions are fine.
        assert!(compile("params.l.map(x, x * 2) == params.l.filter(y, y > 1)").is_ok());
    }

    #[test]
    fn the_worst_expression_within_the_bounds_runs() {
        // As deep and as busy as allowed at once.
        let inner = format!("1{}", " + 1".repeat(MAX_OPERATORS - 2));
        let busy = format!(
            "{}{inner}{} > 0",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        let program = compile(&busy).unwrap();
        assert_eq!(
            execute(&program, &Context::default()).unwrap(),
            cel::Value::Bool(true)
        );
    }

    #[test]
    fn fits_stops_counting_past_the_budget() {
        let list = cel::Value::List(std::sync::Arc::new(vec![cel::Value::Int(1); 1000]));
        let shared = cel::Value::List(std::sync::Arc::new(vec![list; 1_000_000]));
        assert!(!fits(&shared, 1 << 20));
        assert!(fits(
            &cel::Value::String(std::sync::Arc::new("x".repeat(10))),
            12
        ));
    }
}
