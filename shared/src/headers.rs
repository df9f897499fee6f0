//! HTTP headers as the attempt log stores them: one JSON object, names sorted, each once
//! (`{"content-type":"application/json","x-cloudthinker-attempt":"1"}`).
//!
//! Agents write it ([`to_json`]) and send it as `AttemptResult.request_headers_json` and
//! `response_headers_json`, which the control plane stores as it comes once [`is_object`] has
//! checked it: a map of strings costs an allocation per name and per value on each side, hashing
//! on decode and sorting before it is stored.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap as _, Serializer as _};

/// `pairs` as one JSON object, in the order given. Callers give them sorted by name, each name
/// once.
pub fn to_json<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    let size: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 6).sum();
    let mut out = Vec::with_capacity(size + 2);
    let mut ser = serde_json::Serializer::new(&mut out);
    let written = ser.serialize_map(Some(pairs.len())).and_then(|mut map| {
        for (k, v) in pairs {
            map.serialize_entry(k.as_ref(), v.as_ref())?;
        }
        map.end()
    });
    match written {
        // serde_json writes valid UTF-8, and writing into a Vec cannot fail.
        Ok(()) => String::from_utf8(out).unwrap_or_else(|_| "{}".to_owned()),
        Err(_) => "{}".to_owned(),
    }
}

/// Whether `text` is one JSON object whose values are all strings, checked without building it.
pub fn is_object(text: &str) -> bool {
    serde_json::from_str::<Object>(text).is_ok()
}

/// A JSON object of strings, read and forgotten.
struct Object;

/// A JSON string, read and forgotten.
struct Text;

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                while map.next_entry::<Text, Text>()?.is_some() {}
                Ok(Object)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<Text, E> {
                Ok(Text)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_one_json_object() {
        let headers = [("content-type", "application/json"), ("x-quote", "say \"hi\"\n")];
        let json = to_json(&headers);
        assert_eq!(json, r#"{"content-type":"application/json","x-quote":"say \"hi\"\n"}"#);
        let back: std::collections::BTreeMap<String, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["x-quote"], "say \"hi\"\n");
        assert_eq!(to_json::<&str, &str>(&[]), "{}");
        assert!(is_object(&json));
    }

    #[test]
    fn only_objects_of_strings_pass() {
        for good in ["{}", r#"{"a":"b"}"#, r#" { "a" : "\u00e9\n" , "b":"" } "#] {
            assert!(is_object(good), "{good}");
        }
        for bad in
            ["", "[]", "null", r#""a""#, r#"{"a":1}"#, r#"{"a":null}"#, r#"{"a":{"b":"c"}}"#, "{", r#"{"a":"b"} x"#]
        {
            assert!(!is_object(bad), "{bad}");
        }
    }
}
