//! Body transforms: a JSON value whose string leaves are minijinja templates over the envelope.
//!
//! Each rendered leaf is inserted as a JSON string (so a `"` in a title never breaks the body); a
//! leaf that is exactly `{{ expression }}` inserts the expression's typed value (so
//! `"client_payload": "{{ data }}"` is an object). `vars` holds the webhook's `transform_vars`.
//! Rendering runs on fuel, so a template that loops forever fails instead of hanging a
//! dispatcher.

use minijinja::Environment;
use serde::Deserialize as _;
use serde_json::Value as Json;

/// Instructions one leaf may spend.
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

/// The expression of a leaf that is exactly `{{ expression }}`.
fn whole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then(|| inner.trim())
}

/// Compiles every leaf, naming the first that does not compile (for create and update).
pub fn check(transform: &Json, field: &str) -> Result<(), RenderError> {
    let env = environment();
    walk_check(&env, transform, field)
}

fn walk_check(env: &Environment<'static>, v: &Json, path: &str) -> Result<(), RenderError> {
    let fail = |e: minijinja::Error| RenderError { path: path.to_owned(), message: e.to_string() };
    match v {
        Json::String(s) => match whole_expression(s) {
            Some(expr) => env.compile_expression(expr).map(|_| ()).map_err(fail),
            None => env.template_from_str(s).map(|_| ()).map_err(fail),
        },
        Json::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, v)| walk_check(env, v, &format!("{path}[{i}]")))
        }
        Json::Object(map) => map.iter().try_for_each(|(k, v)| walk_check(env, v, &format!("{path}.{k}"))),
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
    let env = environment();
    let body = walk_render(&env, transform, &ctx, "transform")?;
    let bytes = serde_json::to_vec(&body).map_err(|e| fail("transform", e.to_string()))?;
    if bytes.len() > MAX_OUTPUT {
        return Err(fail("transform", format!("renders {} bytes; at most {MAX_OUTPUT}", bytes.len())));
    }
    Ok(bytes)
}

fn walk_render(env: &Environment<'static>, v: &Json, ctx: &minijinja::Value, path: &str) -> Result<Json, RenderError> {
    let fail = |e: String| RenderError { path: path.to_owned(), message: e };
    Ok(match v {
        Json::String(s) => match whole_expression(s) {
            Some(expr) => {
                let value = env.compile_expression(expr).and_then(|e| e.eval(ctx)).map_err(|e| fail(e.to_string()))?;
                if value.is_undefined() {
                    Json::Null
                } else {
                    serde_json::to_value(&value).map_err(|e| fail(e.to_string()))?
                }
            }
            None => Json::String(env.render_str(s, ctx).map_err(|e| fail(e.to_string()))?),
        },
        Json::Array(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| walk_render(env, v, ctx, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), walk_render(env, v, ctx, &format!("{path}.{k}"))?)))
                .collect::<Result<_, RenderError>>()?,
        ),
        other => other.clone(),
    })
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

    #[test]
    fn check_names_the_leaf() {
        assert!(check(&json!({"a": "{{ ok }}"}), "webhook.transform").is_ok());
        assert_eq!(
            check(&json!({"a": ["x", "{{ broken"]}), "webhook.transform").unwrap_err().path,
            "webhook.transform.a[1]"
        );
    }
}
