//! Body transforms: a JSON value whose string leaves are minijinja templates over the envelope.
//!
//! Each rendered leaf is inserted as a JSON string (so a `"` in a title never breaks the body); a
//! leaf that is exactly `{{ expression }}` inserts the expression's typed value (so
//! `"client_payload": "{{ data }}"` is an object). `vars` holds the webhook's `transform_vars`.
//! Rendering runs on fuel, so a template that loops forever fails instead of hanging a
//! dispatcher. The fuel and the output cap are the whole transform's, shared by its leaves: a
//! transform of a thousand loops gets no more than one.

use minijinja::Environment;
use serde::Deserialize as _;
use serde_json::Value as Json;

/// Instructions a whole transform may spend (all its leaves together).
const FUEL: u64 = 100_000;
/// The largest body a transform may produce.
const MAX_OUTPUT: usize = 1024 * 1024;

/// A transform that failed to render.
#[derive(Debug, thiserror::Error)]
#[error("transform failed at {path}: {message}")]
pub struct RenderError {
    pub path: String,
    pub message: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env
}

/// What the leaves of one transform may still spend: fuel, and bytes of output.
struct Budget {
    fuel: u64,
    output: usize,
}

impl Budget {
    fn new() -> Budget {
        Budget { fuel: FUEL, output: MAX_OUTPUT }
    }
}

fn out_of_fuel() -> minijinja::Error {
    minijinja::Error::new(minijinja::ErrorKind::OutOfFuel, format!("the transform spent its {FUEL} steps of fuel"))
}

/// The expression of a leaf that is exactly `{{ expression }}`.
fn whole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then(|| inner.trim())
}

/// Rendered text, refused past `left` bytes: a template that repeats a large string stops at the
/// output limit instead of growing without bound.
struct Capped<'a> {
    out: Vec<u8>,
    left: &'a mut usize,
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > *self.left {
            return Err(std::io::Error::other(format!("renders more than {MAX_OUTPUT} bytes")));
        }
        *self.left -= buf.len();
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The JSON of a whole expression's value, written into at most `left` more bytes. A value can
/// be far larger than the work that made it (`[data] * 100000000` is one step of fuel, and a
/// lazy sequence until it is written out): it is written through the cap, which stops it, rather
/// than built whole and measured after.
fn typed(value: &minijinja::Value, left: &mut usize) -> Result<Json, String> {
    let mut out = Capped { out: Vec::new(), left };
    serde_json::to_writer(&mut out, value)
        .map_err(|e| if e.is_io() { format!("renders more than {MAX_OUTPUT} bytes") } else { e.to_string() })?;
    serde_json::from_slice(&out.out).map_err(|e| e.to_string())
}

/// Renders one template leaf on what is left of `budget`, and takes what it spent.
fn render_leaf(
    env: &mut Environment<'static>,
    source: &str,
    ctx: &minijinja::Value,
    budget: &mut Budget,
) -> Result<String, minijinja::Error> {
    if budget.fuel == 0 {
        return Err(out_of_fuel());
    }
    env.set_fuel(Some(budget.fuel));
    let template = env.template_from_str(source)?;
    let mut out = Capped { out: Vec::new(), left: &mut budget.output };
    let captured = template.render_captured_to(ctx.clone(), &mut out).map_err(|e| match e.kind() {
        minijinja::ErrorKind::WriteFailure => {
            minijinja::Error::new(minijinja::ErrorKind::WriteFailure, format!("renders more than {MAX_OUTPUT} bytes"))
        }
        _ => e,
    })?;
    let spent = captured.state().fuel_levels().map_or(0, |(consumed, _)| consumed);
    let text = String::from_utf8_lossy(&out.out).into_owned();
    budget.fuel = budget.fuel.saturating_sub(spent);
    Ok(text)
}

/// Evaluates a whole-expression leaf on what is left of `budget`'s fuel, and writes its value
/// into what is left of its output. (An expression has no loops: its steps are bounded by its
/// text, which the transform's size bounds.)
fn eval_leaf(
    env: &mut Environment<'static>,
    expr: &str,
    ctx: &minijinja::Value,
    budget: &mut Budget,
) -> Result<Option<Json>, String> {
    if budget.fuel == 0 {
        return Err(out_of_fuel().to_string());
    }
    env.set_fuel(Some(budget.fuel));
    let value = env.compile_expression(expr).and_then(|e| e.eval(ctx)).map_err(|e| e.to_string())?;
    if value.is_undefined() { Ok(None) } else { typed(&value, &mut budget.output).map(Some) }
}

/// Errors a leaf makes whatever the event holds: a loop past its fuel, output past the limit,
/// recursion past the limit, a filter, test, function or method that does not exist.
fn independent_of_data(e: &minijinja::Error) -> bool {
    use minijinja::ErrorKind::*;
    matches!(
        e.kind(),
        OutOfFuel | WriteFailure | UnknownFilter | UnknownTest | UnknownFunction | UnknownMethod | UnknownBlock
    ) || e.to_string().contains("recursion limit")
}

/// Compiles every leaf, naming the first that does not compile, then renders it over a sample
/// envelope so that a leaf that fails whatever the event is (a loop past its fuel, output past
/// the limit, an unknown filter) is refused at create and update rather than failing every
/// delivery. Other render errors depend on the event's data (`data.title` of an event without
/// one) and are left to delivery time.
pub fn check(transform: &Json, field: &str) -> Result<(), RenderError> {
    let mut env = environment();
    let sample = minijinja::context! {
        id => "evt_sample", type => "incident.created", timestamp => "2024-01-15T10:30:00Z",
        workspace_id => "ws_sample", data => minijinja::context! {},
        vars => minijinja::context! {},
    };
    walk_check(&mut env, transform, &sample, field, &mut Budget::new())
}

fn walk_check(
    env: &mut Environment<'static>,
    v: &Json,
    sample: &minijinja::Value,
    path: &str,
    budget: &mut Budget,
) -> Result<(), RenderError> {
    let fail = |message: String| RenderError { path: path.to_owned(), message };
    let judge = |r: Result<(), minijinja::Error>| match r {
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(fail(format!(
            "does not finish within {FUEL} steps of fuel, which the whole transform shares (a loop?)"
        ))),
        Err(e) if independent_of_data(&e) => Err(fail(format!("fails whatever the event: {e}"))),
        _ => Ok(()),
    };
    match v {
        Json::String(s) => match whole_expression(s) {
            Some(expr) => {
                env.set_fuel(Some(budget.fuel.max(1)));
                let compiled = env.compile_expression(expr).map_err(|e| fail(e.to_string()))?;
                match compiled.eval(sample) {
                    // Too large even over the empty sample: too large for any event.
                    Ok(value) => match typed(&value, &mut MAX_OUTPUT.clone()) {
                        Err(e) if e.contains("renders more than") => {
                            Err(fail(format!("fails whatever the event: {e}")))
                        }
                        _ => Ok(()),
                    },
                    Err(e) => judge(Err(e)),
                }
            }
            None => {
                env.template_from_str(s).map_err(|e| fail(e.to_string()))?;
                // Output is not carried from leaf to leaf here: over the empty sample a leaf's
                // output says little of an event's.
                let mut leaf = Budget { fuel: budget.fuel, output: MAX_OUTPUT };
                let judged = judge(render_leaf(env, s, sample, &mut leaf).map(|_| ()));
                budget.fuel = leaf.fuel;
                judged
            }
        },
        Json::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, v)| walk_check(env, v, sample, &format!("{path}[{i}]"), budget))
        }
        Json::Object(map) => {
            map.iter().try_for_each(|(k, v)| walk_check(env, v, sample, &format!("{path}.{k}"), budget))
        }
        _ => Ok(()),
    }
}

/// Renders `transform` over the envelope (`id`, `type`, `timestamp`, `workspace_id`, `data`) and
/// `vars`, returning the body to send.
pub fn render(
    transform: &Json,
    envelope: &[u8],
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<u8>, RenderError> {
    let fail = |path: &str, message: String| RenderError { path: path.to_owned(), message };
    let mut ctx: Json = serde_json::from_slice(envelope).map_err(|e| fail("envelope", e.to_string()))?;
    if let Json::Object(map) = &mut ctx {
        map.insert("vars".into(), serde_json::to_value(vars).map_err(|e| fail("vars", e.to_string()))?);
    }
    let ctx = minijinja::Value::deserialize(ctx).map_err(|e| fail("envelope", e.to_string()))?;
    let mut env = environment();
    let body = walk_render(&mut env, transform, &ctx, "transform", &mut Budget::new())?;
    let bytes = serde_json::to_vec(&body).map_err(|e| fail("transform", e.to_string()))?;
    if bytes.len() > MAX_OUTPUT {
        return Err(fail("transform", format!("renders {} bytes; at most {MAX_OUTPUT}", bytes.len())));
    }
    Ok(bytes)
}

fn walk_render(
    env: &mut Environment<'static>,
    v: &Json,
    ctx: &minijinja::Value,
    path: &str,
    budget: &mut Budget,
) -> Result<Json, RenderError> {
    let fail = |e: String| RenderError { path: path.to_owned(), message: e };
    Ok(match v {
        Json::String(s) => match whole_expression(s) {
            Some(expr) => eval_leaf(env, expr, ctx, budget).map_err(fail)?.unwrap_or(Json::Null),
            None => Json::String(render_leaf(env, s, ctx, budget).map_err(|e| fail(e.to_string()))?),
        },
        Json::Array(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| walk_render(env, v, ctx, &format!("{path}[{i}]"), budget))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), walk_render(env, v, ctx, &format!("{path}.{k}"), budget)?)))
                .collect::<Result<_, RenderError>>()?,
        ),
        other => other.clone(),
    })
}

/// `body` with every non-empty value of `vars` (and its JSON-escaped spelling) replaced by
/// `***`, for the attempt log: a transform may place a secret variable (a routing key, a token)
/// in the body it sends, and the log must not keep it.
pub fn redact(body: &str, vars: &std::collections::BTreeMap<String, String>) -> String {
    let mut values: Vec<String> = Vec::new();
    for v in vars.values().filter(|v| !v.is_empty()) {
        let escaped = serde_json::to_string(v).expect("strings serialize");
        values.push(escaped[1..escaped.len() - 1].to_owned());
        values.push(v.clone());
    }
    // Longest first, so a value containing another is replaced whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values.into_iter().fold(body.to_owned(), |body, v| body.replace(&v, "***"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ENVELOPE: &[u8] = br#"{"id":"evt_1","type":"incident.created","timestamp":"2024-01-15T10:30:00Z","workspace_id":"ws_1","data":{"title":"DB \"primary\" down","severity":3,"tags":["db"]}}"#;

    fn vars() -> std::collections::BTreeMap<String, String> {
        [("routing_key".to_owned(), "R123".to_owned())].into()
    }

    #[test]
    fn slack_text_is_rendered_and_escaped() {
        let out = render(&json!({"text": "New {{ type }}: {{ data.title }}"}), ENVELOPE, &vars()).unwrap();
        let v: Json = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["text"], "New incident.created: DB \"primary\" down");
    }

    #[test]
    fn whole_expressions_keep_their_type() {
        let t = json!({"payload": "{{ data }}", "n": "{{ data.severity }}", "key": "{{ vars.routing_key }}", "kind": "{{ type | replace('.', '-') }}", "fixed": 7});
        let v: Json = serde_json::from_slice(&render(&t, ENVELOPE, &vars()).unwrap()).unwrap();
        assert_eq!(v["payload"]["tags"], json!(["db"]));
        assert_eq!(v["n"], 3);
        assert_eq!(v["key"], "R123");
        assert_eq!(v["kind"], "incident-created");
        assert_eq!(v["fixed"], 7);
    }

    #[test]
    fn loops_run_out_of_fuel() {
        let t = json!({"x": "{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}"});
        let err = render(&t, ENVELOPE, &vars()).unwrap_err();
        assert_eq!(err.path, "transform.x");
    }

    /// The fuel a loop of `n` empty turns spends, rendered alone.
    fn fuel_of_a_loop(n: u64) -> u64 {
        let env = environment();
        let source = format!("{{% for i in range({n}) %}}{{% endfor %}}");
        let t = env.template_from_str(&source).unwrap();
        t.render_captured_to(minijinja::context! {}, std::io::sink()).unwrap().state().fuel_levels().unwrap().0
    }

    /// The fuel is the whole transform's: a leaf that spends three fifths of it renders alone,
    /// but two such leaves do not, and fifty are refused at check, where each leaf on fuel of
    /// its own let the transform spend fifty times as much on every delivery.
    #[test]
    fn the_leaves_of_a_transform_share_its_fuel() {
        let per_turn = fuel_of_a_loop(1000) as f64 / 1000.0;
        let n = (FUEL as f64 * 0.6 / per_turn) as u64;
        let spent = fuel_of_a_loop(n);
        assert!(spent > FUEL / 2 && spent < FUEL, "{n} turns spend {spent}");
        let leaf = format!("{{% for i in range({n}) %}}{{% endfor %}}done");
        let one = json!({ "a": leaf });
        let v: Json = serde_json::from_slice(&render(&one, ENVELOPE, &vars()).unwrap()).unwrap();
        assert_eq!(v["a"], "done");
        check(&one, "t").unwrap();
        let two = json!({ "a": leaf, "b": leaf });
        let err = render(&two, ENVELOPE, &vars()).unwrap_err();
        assert_eq!(err.path, "transform.b", "the second leaf finds the fuel spent");
        assert!(err.message.contains("fuel"), "{}", err.message);
        let fifty: serde_json::Map<String, Json> = (0..50).map(|i| (format!("k{i}"), json!(leaf))).collect();
        let err = check(&Json::Object(fifty), "t").unwrap_err();
        assert!(err.message.contains("fuel, which the whole transform shares"), "{}", err.message);
    }

    #[test]
    fn output_is_capped_while_it_renders() {
        let huge = json!({"x": "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}"});
        let err = render(&huge, ENVELOPE, &vars()).unwrap_err();
        assert!(err.message.contains("renders more than"), "{}", err.message);
        let err = check(&huge, "t").unwrap_err();
        assert!(err.message.contains("renders more than"), "{}", err.message);
    }

    /// A whole expression whose value is far larger than the work that made it (one step of
    /// fuel for a list repeated a hundred million times) stops at the output cap while it is
    /// written out, and is refused at check; so do many leaves that each copy a large event.
    #[test]
    fn a_value_larger_than_its_work_is_capped_as_it_is_written() {
        let repeated = json!({"x": "{{ [data] * 100000000 }}"});
        let err = render(&repeated, ENVELOPE, &vars()).unwrap_err();
        assert!(err.message.contains("renders more than"), "{}", err.message);
        assert_eq!(err.path, "transform.x");
        let err = check(&repeated, "t").unwrap_err();
        assert!(err.message.contains("renders more than"), "{}", err.message);
        let many: serde_json::Map<String, Json> = (0..40).map(|i| (format!("k{i}"), json!("{{ data }}"))).collect();
        let big = format!(
            r#"{{"id":"evt_1","type":"t","timestamp":"x","workspace_id":"w","data":{{"s":"{}"}}}}"#,
            "y".repeat(64 << 10)
        );
        let err = render(&Json::Object(many.clone()), big.as_bytes(), &vars()).unwrap_err();
        assert!(err.message.contains("renders more than"), "{}", err.message);
        let small: serde_json::Map<String, Json> = many.into_iter().take(10).collect();
        assert!(render(&Json::Object(small), big.as_bytes(), &vars()).is_ok(), "640 KiB is within the cap");
    }

    #[test]
    fn data_independent_failures_are_refused_at_check() {
        for leaf in [
            "{{ type | no_such_filter }}",
            "{{ no_such_function() }}",
            "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
        ] {
            let err = check(&json!({"a": leaf}), "t").unwrap_err();
            assert_eq!(err.path, "t.a", "{leaf}");
        }
    }

    #[test]
    fn secrets_in_vars_are_redacted_from_the_logged_body() {
        let vars = [("key".to_owned(), "R0UT\"ING".to_owned()), ("empty".to_owned(), String::new())].into();
        let body =
            render(&json!({"routing_key": "{{ vars.key }}", "k": "key={{ vars.key }}"}), ENVELOPE, &vars).unwrap();
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains(r#"R0UT\"ING"#));
        let logged = redact(&body, &vars);
        assert!(!logged.contains("R0UT"), "{logged}");
        assert_eq!(logged, r#"{"k":"key=***","routing_key":"***"}"#);
    }

    #[test]
    fn check_names_the_leaf() {
        assert!(check(&json!({"a": "{{ ok }}"}), "webhook.transform").is_ok());
        assert_eq!(
            check(&json!({"a": ["x", "{{ broken"]}), "webhook.transform").unwrap_err().path,
            "webhook.transform.a[1]"
        );
        let looping =
            json!({"a": {"b": "{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}"}});
        let err = check(&looping, "webhook.transform").unwrap_err();
        assert_eq!(err.path, "webhook.transform.a.b");
        assert!(err.message.contains("fuel"), "{}", err.message);
        // What depends on the event's data is judged when an event is there.
        assert!(check(&json!({"t": "{{ data.incident.title }}", "n": "{{ data.items | length }}"}), "t").is_ok());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_text_in_the_data_renders_to_valid_json_unchanged(title in any::<String>(), n in any::<i64>()) {
                let data = json!({"title": title, "n": n}).to_string();
                let envelope = herald_shared::envelope::build("evt_1", "incident.created", "t", "ws_1", &data);
                let t = json!({"text": "{{ data.title }}", "quoted": "title: {{ data.title }}", "n": "{{ data.n }}", "all": "{{ data }}"});
                let v: Json = serde_json::from_slice(&render(&t, &envelope, &vars()).unwrap()).unwrap();
                prop_assert_eq!(&v["text"], &Json::String(title.clone()));
                prop_assert_eq!(&v["quoted"], &Json::String(format!("title: {title}")));
                prop_assert_eq!(&v["n"], &json!(n));
                prop_assert_eq!(&v["all"], &serde_json::from_str::<Json>(&data).unwrap());
            }

            #[test]
            fn any_template_is_judged_without_panicking_and_renders_json_or_an_error(
                text in any::<String>(),
                jinja in r"\{[{%] [a-z_.|()0-9' ]{0,24} [}%]\}",
            ) {
                let t = json!({"a": text, "b": jinja, "c": [format!("{{{{ {text} }}}}")]});
                let checked = check(&t, "t");
                if let Err(e) = &checked {
                    prop_assert!(e.path.starts_with("t."), "the failing leaf is named: {}", e.path);
                }
                if let Ok(body) = render(&t, ENVELOPE, &vars()) {
                    prop_assert!(checked.is_ok(), "what renders also passes the check");
                    prop_assert!(serde_json::from_slice::<Json>(&body).is_ok());
                }
            }
        }
    }
}
