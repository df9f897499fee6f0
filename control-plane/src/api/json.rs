//! Conversions between `google.protobuf.Struct`/`Value` (friendly for grpcurl) and JSON.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::Value as Json;

/// Nesting deeper than this is refused: it protects the recursive conversions and every receiver
/// that parses the payload.
pub const MAX_DEPTH: usize = 64;

/// A protobuf value as JSON, or `None` when it nests deeper than `MAX_DEPTH` or holds a number
/// JSON cannot carry (NaN, infinity). Whole numbers become JSON integers. `depth` counts the
/// containers around `v`, the same way `depth()` counts them in JSON.
pub fn to_json(v: &Value, depth: usize) -> Option<Json> {
    Some(match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                Json::from(*n as i64)
            } else {
                Json::from(serde_json::Number::from_f64(*n)?)
            }
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            if depth + 1 > MAX_DEPTH {
                return None;
            }
            Json::Array(l.values.iter().map(|v| to_json(v, depth + 1)).collect::<Option<_>>()?)
        }
        Some(Kind::StructValue(s)) => struct_to_json(s, depth)?,
    })
}

/// A protobuf struct as a JSON object; `depth` counts the containers around it.
pub fn struct_to_json(s: &Struct, depth: usize) -> Option<Json> {
    let depth = depth + 1;
    if depth > MAX_DEPTH {
        return None;
    }
    let mut map = serde_json::Map::with_capacity(s.fields.len());
    for (k, v) in &s.fields {
        map.insert(k.clone(), to_json(v, depth)?);
    }
    Some(Json::Object(map))
}

/// JSON as a protobuf value.
pub fn from_json(j: &Json) -> Value {
    let kind = match j {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue { values: a.iter().map(from_json).collect() }),
        Json::Object(o) => {
            Kind::StructValue(Struct { fields: o.iter().map(|(k, v)| (k.clone(), from_json(v))).collect() })
        }
    };
    Value { kind: Some(kind) }
}

/// A JSON object as a protobuf struct (anything else gives an empty struct).
pub fn struct_from_json(j: &Json) -> Struct {
    match from_json(j).kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    }
}

/// Depth of a JSON value (a scalar is 0).
pub fn depth(j: &Json) -> usize {
    match j {
        Json::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Json::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Why a JSON text is not an acceptable payload.
#[derive(Debug)]
pub enum PayloadError {
    NotJson(serde_json::Error),
    NotObject,
    TooDeep,
}

/// Checks that `text` is one JSON object nesting at most `MAX_DEPTH` containers, without building
/// it: publishing keeps the text as given, so a tree of it would only be allocated to be dropped.
/// The answer is the one a parse into a tree would give, in its order: not JSON (the parser's
/// own recursion limit included), then not an object, then too deep.
pub fn check_payload(text: &str) -> Result<(), PayloadError> {
    use serde::de::DeserializeSeed as _;
    let mut de = serde_json::Deserializer::from_str(text);
    let too_deep = std::cell::Cell::new(false);
    let checked = Nest { depth: 0, limit: MAX_DEPTH, too_deep: &too_deep }.deserialize(&mut de).and_then(|()| de.end());
    if let Err(e) = checked {
        if !too_deep.get() {
            return Err(PayloadError::NotJson(e));
        }
        // Past the depth, the text may still be invalid further on, or not an object: the
        // whole of it is read again (rare), keeping nothing, to the parser's own limit.
        let mut de = serde_json::Deserializer::from_str(text);
        Nest { depth: 0, limit: usize::MAX, too_deep: &too_deep }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(PayloadError::NotJson)?;
    }
    // Valid JSON that starts with `{` is an object.
    if !text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
        return Err(PayloadError::NotObject);
    }
    if too_deep.get() {
        return Err(PayloadError::TooDeep);
    }
    Ok(())
}

/// Visits a JSON value `depth` containers deep, keeping nothing, and fails past `limit`. Keys,
/// strings and numbers are read as a tree's would be (escapes, surrogates, number range), so
/// the same texts fail.
struct Nest<'a> {
    depth: usize,
    limit: usize,
    too_deep: &'a std::cell::Cell<bool>,
}

/// An object's key, read as a string and dropped.
struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for Key {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Nest<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Nest<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner::<A::Error>()?;
        while seq.next_element_seed(Nest { ..inner })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner::<A::Error>()?;
        while map.next_key_seed(Key)?.is_some() {
            map.next_value_seed(Nest { ..inner })?;
        }
        Ok(())
    }
}

impl<'a> Nest<'a> {
    /// The seed for the values inside this container, or an error past `MAX_DEPTH`.
    fn inner<E: serde::de::Error>(&self) -> Result<Nest<'a>, E> {
        if self.depth + 1 > self.limit {
            self.too_deep.set(true);
            return Err(E::custom(format!("nests deeper than {} levels", self.limit)));
        }
        Ok(Nest { depth: self.depth + 1, limit: self.limit, too_deep: self.too_deep })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let j = json!({"title": "DB down", "n": 3, "f": 1.5, "ok": true, "none": null, "list": [1, "a"]});
        let back = struct_to_json(&struct_from_json(&j), 0).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn depth_counts_like_json() {
        let mut j = json!({});
        for _ in 1..MAX_DEPTH {
            j = json!({ "a": j });
        }
        assert_eq!(depth(&j), MAX_DEPTH);
        let s = struct_from_json(&j);
        assert!(struct_to_json(&s, 0).is_some(), "a payload JSON accepts is accepted as a Struct too");
        let deeper = struct_from_json(&json!({ "a": j }));
        assert!(struct_to_json(&deeper, 0).is_none());
    }

    #[test]
    fn too_deep_is_refused() {
        let mut v = Value { kind: Some(Kind::NullValue(0)) };
        for _ in 0..(MAX_DEPTH + 2) {
            v = Value { kind: Some(Kind::ListValue(ListValue { values: vec![v] })) };
        }
        assert!(to_json(&v, 0).is_none());
        let nan = Value { kind: Some(Kind::NumberValue(f64::NAN)) };
        assert!(to_json(&nan, 0).is_none());
    }

    #[test]
    fn payloads_are_checked_as_the_parsed_tree_would_be() {
        let nested = |n: usize, open: &str, close: &str| format!("{{\"a\": {}1{}}}", open.repeat(n), close.repeat(n));
        let cases = [
            nested(MAX_DEPTH - 1, "[", "]"),
            nested(MAX_DEPTH, "[", "]"),
            nested(MAX_DEPTH - 1, "{\"b\": ", "}"),
            nested(MAX_DEPTH, "{\"b\": ", "}"),
            nested(200, "[", "]"),
            nested(200, "{\"b\": ", "}"),
            "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1),
            "[".repeat(200) + &"]".repeat(200),
            nested(MAX_DEPTH, "[", "]").replace("1]", "1,]"),
            format!("{} x", nested(MAX_DEPTH, "[", "]")),
            nested(MAX_DEPTH, "[", "]").replace("1", "1e400"),
            "\u{feff}{}".to_owned(),
            r#"{"\ud800": 1}"#.to_owned(),
            r#"{"a": "\ud800"}"#.to_owned(),
            r#"{"a": "\ud83d\ude00", "\ud83d\ude00": 1}"#.to_owned(),
            r#"{"a": 1e400}"#.to_owned(),
            r#"{"a": 123456789012345678901234567890}"#.to_owned(),
            r#"{"a": 1, "a": 2}"#.to_owned(),
            r#"{"a\x": 1}"#.to_owned(),
            r#"{"title": "DB down", "list": [1, {"x": [null, true]}], "s": "\u00e9\"}"}"#.to_owned(),
            " \n\t{}".to_owned(),
            "{}".to_owned(),
            "[]".to_owned(),
            "\"text\"".to_owned(),
            "3".to_owned(),
            "null".to_owned(),
            "{".to_owned(),
            "{} {}".to_owned(),
            "{\"a\": 1,}".to_owned(),
            String::new(),
        ];
        for text in cases {
            // What the tree-building check said: parse, then object, then depth.
            let want = match serde_json::from_str::<Json>(&text) {
                Err(_) => "json",
                Ok(j) if !j.is_object() => "object",
                Ok(j) if depth(&j) > MAX_DEPTH => "deep",
                Ok(_) => "ok",
            };
            let got = match check_payload(&text) {
                Ok(()) => "ok",
                Err(PayloadError::NotJson(_)) => "json",
                Err(PayloadError::NotObject) => "object",
                Err(PayloadError::TooDeep) => "deep",
            };
            assert_eq!(got, want, "{text:.80}");
        }
    }
}
