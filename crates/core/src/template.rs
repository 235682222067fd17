//! `${{ … }}` templates in step params, resolved when the step becomes ready.
//!
//! Inside the braces is a CEL expression over `params` (the run's params) and
//! `steps.<id>.output` / `steps.<id>.status` of steps that finish before this one. A string that
//! is exactly one template becomes the expression's JSON value (a number stays a number, a list a
//! list); a template inside a longer string is spliced in as text. A reference to a value that
//! does not exist fails the step with the reason.
//!
//! In the params of a `for_each` step, `item` (the instance's item) and `index` (its position,
//! from 0) may be read too.
//!
//! `${{ secrets.NAME }}` is a reference, not an expression: it is left as it is when params are
//! rendered, so that only the reference is stored and sent, and the worker resolves it (see
//! [`secret_references`]). It must stand alone in its braces.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::condition::PARAMS;

/// The variable that holds the finished steps.
pub const STEPS: &str = "steps";
/// The item of a `for_each` instance.
pub const ITEM: &str = "item";
/// The position of a `for_each` instance's item, from 0.
pub const INDEX: &str = "index";
/// The variable a secret reference reads: `${{ secrets.NAME }}`.
pub const SECRETS: &str = "secrets";
/// The longest rendered params accepted, in bytes of JSON.
pub const MAX_RENDERED_BYTES: usize = 1 << 20;

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

/// Checks every template in `params` and returns the step ids they read; `item` and `index` may
/// be read only when `in_loop` (the params of a `for_each` step).
pub fn check(params: &Map<String, Value>, in_loop: bool) -> Result<BTreeSet<String>, String> {
    let mut steps = BTreeSet::new();
    let mut error = None;
    visit_strings(params, &mut |text| {
        for expr in expressions(text) {
            if expr.as_ref().is_ok_and(|e| secret_name(e).is_some()) {
                continue;
            }
            match expr.and_then(|e| compile(e).map(|p| (e, p))) {
                Ok((source, program)) => {
                    for var in program.references().variables() {
                        let loop_var = var == ITEM || var == INDEX;
                        if loop_var && !in_loop {
                            error.get_or_insert(format!(
                                "template `{source}` reads `{var}`, which only the params of a `for_each` step may read"
                            ));
                        } else if var == SECRETS {
                            error.get_or_insert(format!(
                                "template `{source}` reads `{SECRETS}`: a secret can only be passed whole, as `${{{{ {SECRETS}.NAME }}}}` (NAME: letters, digits, `_`), for the worker to resolve"
                            ));
                        } else if !loop_var && var != PARAMS && var != STEPS {
                            error.get_or_insert(format!(
                                "template `{source}` reads `{var}`; templates may read `params` and `steps`"
                            ));
                        }
                    }
                    steps.extend(step_ids(source));
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(steps),
    }
}

/// Whether `params` holds any template.
pub fn has_templates(params: &Map<String, Value>) -> bool {
    let mut found = false;
    visit_strings(params, &mut |text| found |= text.contains(OPEN));
    found
}

/// Renders every template in `params`. `steps` holds, for the step ids the templates read,
/// `{"output": …, "status": …}`; `item` is a `for_each` instance's item and its index.
pub fn render(
    params: &Map<String, Value>,
    run_params: &Map<String, Value>,
    steps: Map<String, Value>,
    item: Option<(&Value, usize)>,
) -> Result<Map<String, Value>, String> {
    let mut reads_params = false;
    visit_strings(params, &mut |text| reads_params |= text.contains(PARAMS));
    let ctx = context(reads_params.then_some(run_params), steps, item)?;
    let mut out = Map::new();
    for (key, value) in params {
        out.insert(key.clone(), render_value(value, &ctx)?);
    }
    let size = serde_json::to_vec(&out).map_or(0, |b| b.len());
    if size > MAX_RENDERED_BYTES {
        return Err(format!(
            "rendered params are {size} bytes; at most {MAX_RENDERED_BYTES} are allowed"
        ));
    }
    Ok(out)
}

/// Renders one string that holds templates (a `for_each` list, say) into its JSON value.
pub fn render_text(
    text: &str,
    run_params: &Map<String, Value>,
    steps: Map<String, Value>,
) -> Result<Value, String> {
    let reads_params = text.contains(PARAMS);
    render_string(
        text,
        &context(reads_params.then_some(run_params), steps, None)?,
    )
}

/// The variables templates read. The run's params are bound only when some template may read
/// them (its text names them): converting them costs as much as they are large, for every
/// instance of a `for_each` step.
fn context(
    run_params: Option<&Map<String, Value>>,
    steps: Map<String, Value>,
    item: Option<(&Value, usize)>,
) -> Result<cel::Context<'static, 'static>, String> {
    let mut ctx = cel::Context::default();
    if let Some(run_params) = run_params {
        ctx.add_variable(PARAMS, Value::Object(run_params.clone()))
            .map_err(|e| format!("cannot bind params: {e}"))?;
    }
    ctx.add_variable(STEPS, Value::Object(steps))
        .map_err(|e| format!("cannot bind steps: {e}"))?;
    if let Some((item, index)) = item {
        ctx.add_variable(ITEM, item.clone())
            .map_err(|e| format!("cannot bind item: {e}"))?;
        ctx.add_variable(INDEX, Value::from(index))
            .map_err(|e| format!("cannot bind index: {e}"))?;
    }
    Ok(ctx)
}

fn render_value(value: &Value, ctx: &cel::Context) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) if text.contains(OPEN) => render_string(text, ctx)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_value(v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_value(v, ctx)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn render_string(text: &str, ctx: &cel::Context) -> Result<Value, String> {
    let trimmed = text.trim();
    if let Some(inner) = trimmed
        .strip_prefix(OPEN)
        .and_then(|t| t.strip_suffix(CLOSE))
        && !inner.contains(OPEN)
    {
        if secret_name(inner.trim()).is_some() {
            return Ok(Value::String(text.to_owned()));
        }
        return evaluate(inner.trim(), ctx);
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let end = after
            .find(CLOSE)
            .ok_or_else(|| format!("unclosed template in `{text}`"))?;
        let source = after[..end].trim();
        if secret_name(source).is_some() {
            out.push_str(&rest[start..start + OPEN.len() + end + CLOSE.len()]);
        } else {
            match evaluate(source, ctx)? {
                Value::String(s) => out.push_str(&s),
                other => out.push_str(&other.to_string()),
            }
        }
        rest = &after[end + CLOSE.len()..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

fn evaluate(source: &str, ctx: &cel::Context) -> Result<Value, String> {
    let program = compile(source)?;
    let value = crate::expression::execute(&program, ctx)
        .map_err(|e| format!("template `{source}` cannot be resolved: {e}"))?;
    // A small expression can make a large value (a list repeated in every item of another):
    // measure it before it is written out.
    if !crate::expression::fits(&value, MAX_RENDERED_BYTES) {
        return Err(format!(
            "template `{source}` gives a value over {MAX_RENDERED_BYTES} bytes, the most rendered params may take"
        ));
    }
    value
        .json()
        .map_err(|e| format!("template `{source}` gives a value that is not JSON: {e:?}"))
}

fn compile(source: &str) -> Result<cel::Program, String> {
    crate::expression::compile(source).map_err(|e| format!("template `{source}` {e}"))
}

/// The expressions of a string's templates.
fn expressions(text: &str) -> Vec<Result<&str, String>> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        match after.find(CLOSE) {
            Some(end) => {
                found.push(Ok(after[..end].trim()));
                rest = &after[end + CLOSE.len()..];
            }
            None => {
                found.push(Err(format!("unclosed template in `{text}`")));
                break;
            }
        }
    }
    found
}

/// The name a template's expression refers to when it is exactly `secrets.NAME`.
fn secret_name(source: &str) -> Option<&str> {
    let name = source
        .strip_prefix(SECRETS)?
        .trim_start()
        .strip_prefix('.')?
        .trim_start();
    let mut chars = name.chars();
    let first = chars.next()?;
    ((first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'))
    .then_some(name)
}

/// The secret references in `text`: each `${{ secrets.NAME }}`'s byte range and NAME, in order.
/// What a worker replaces with the secret's value.
pub fn secret_references(text: &str) -> Vec<(std::ops::Range<usize>, &str)> {
    let mut found = Vec::new();
    let mut offset = 0;
    while let Some(start) = text[offset..].find(OPEN).map(|i| offset + i) {
        let inner_start = start + OPEN.len();
        let Some(end) = text[inner_start..].find(CLOSE).map(|i| inner_start + i) else {
            break;
        };
        if let Some(name) = secret_name(text[inner_start..end].trim()) {
            found.push((start..end + CLOSE.len(), name));
        }
        offset = end + CLOSE.len();
    }
    found
}

/// The step ids an expression reads as `steps.<id>`.
fn step_ids(source: &str) -> Vec<String> {
    let prefix = format!("{STEPS}.");
    source
        .match_indices(&prefix)
        .filter(|(i, _)| {
            // Only where `steps` is a whole name, not the tail of another.
            source[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        })
        .map(|(i, _)| {
            source[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect()
        })
        .collect()
}

fn visit_strings(params: &Map<String, Value>, f: &mut impl FnMut(&str)) {
    fn walk(value: &Value, f: &mut impl FnMut(&str)) {
        match value {
            Value::String(s) => f(s),
            Value::Array(items) => items.iter().for_each(|v| walk(v, f)),
            Value::Object(map) => map.values().for_each(|v| walk(v, f)),
            _ => {}
        }
    }
    params.values().for_each(|v| walk(v, f));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn whole_templates_keep_their_type_and_inline_ones_splice_text() {
        let params = map(json!({
            "name": "${{ params.projectName }}",
            "count": "${{ params.n }}",
            "artifact": "${{ steps.build.output.artifact }}",
            "label": "build of ${{ params.projectName }} #${{ params.n }}",
            "nested": [{"items": "${{ params.items }}"}],
            "plain": 7
        }));
        let run = map(json!({"projectName": "my-app", "n": 3, "items": [1, 2]}));
        let steps = map(json!({"build": {"output": {"artifact": "app.tar"}, "status": "success"}}));
        assert_eq!(
            check(&params, false).unwrap(),
            BTreeSet::from(["build".to_string()])
        );
        assert_eq!(
            Value::Object(render(&params, &run, steps, None).unwrap()),
            json!({
                "name": "my-app",
                "count": 3,
                "artifact": "app.tar",
                "label": "build of my-app #3",
                "nested": [{"items": [1, 2]}],
                "plain": 7
            })
        );
    }

    #[test]
    fn a_missing_value_is_an_error_that_names_it() {
        let params = map(json!({"x": "${{ params.absent }}"}));
        let err = render(&params, &Map::new(), Map::new(), None).unwrap_err();
        assert!(
            err.contains("params.absent") && err.contains("absent"),
            "{err}"
        );
    }

    #[test]
    fn bad_templates_are_refused_when_checked() {
        assert!(
            check(&map(json!({"x": "${{ params.a + }}"})), false)
                .unwrap_err()
                .contains("does not parse")
        );
        assert!(
            check(&map(json!({"x": "${{ secret }}"})), true)
                .unwrap_err()
                .contains("`secret`")
        );
        assert!(
            check(&map(json!({"x": "${{ params.a"})), false)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(!has_templates(&map(json!({"x": "plain"}))));
    }

    #[test]
    fn item_and_index_are_read_only_in_a_loop() {
        let params = map(json!({"name": "${{ item.name }}", "n": "${{ index }}"}));
        assert!(
            check(&params, false)
                .unwrap_err()
                .contains("only the params of a `for_each` step")
        );
        assert!(check(&params, true).unwrap().is_empty());
        let item = json!({"name": "a"});
        assert_eq!(
            Value::Object(render(&params, &Map::new(), Map::new(), Some((&item, 2))).unwrap()),
            json!({"name": "a", "n": 2})
        );
    }

    #[test]
    fn secret_references_are_kept_for_the_worker_and_nothing_else_reads_secrets() {
        let params = map(json!({
            "token": "${{ secrets.API_TOKEN }}",
            "header": "Bearer ${{secrets.API_TOKEN}} for ${{ params.who }}",
        }));
        assert!(check(&params, false).unwrap().is_empty());
        let run = map(json!({"who": "ci"}));
        assert_eq!(
            Value::Object(render(&params, &run, Map::new(), None).unwrap()),
            json!({
                "token": "${{ secrets.API_TOKEN }}",
                "header": "Bearer ${{secrets.API_TOKEN}} for ci",
            })
        );
        assert_eq!(
            secret_references("a ${{ secrets.A }} b ${{ params.x }} ${{secrets._b2}}"),
            vec![(2..18, "A"), (37..53, "_b2")]
        );
        for bad in [
            "${{ secrets.A + 'x' }}",
            "${{ secrets }}",
            "${{ secrets['A'] }}",
            "${{ size(secrets.A) }}",
        ] {
            let err = check(&map(json!({"x": bad})), false).unwrap_err();
            assert!(
                err.contains("a secret can only be passed whole"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_whole_template_renders_to_its_json_value() {
        let run = map(json!({"items": [1, "two"]}));
        assert_eq!(
            render_text("${{ params.items }}", &run, Map::new()).unwrap(),
            json!([1, "two"])
        );
    }
}
