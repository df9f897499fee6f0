//! HTTP headers as the attempt log stores them: one JSON object of strings, names sorted, each
//! once (`{"content-type":"application/json","x-cloudthinker-attempt":"1"}`).
//!
//! Agents write it ([`to_json`], from pairs they have sorted) and send it as
//! `AttemptResult.request_headers_json` and `response_headers_json`, which the control plane
//! stores as it comes once [`is_object`] has checked it: a map of strings costs an allocation
//! per name and per value on each side, hashing on decode and sorting before it is stored.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
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

/// Whether `text` is one JSON object whose values are all strings and whose names are sorted,
/// each once: checked without building it.
pub fn is_object(text: &str) -> bool {
    serde_json::from_str::<Object>(text).is_ok()
}

/// The pairs of such an object (for a peer that takes headers as a map); empty if `text` is not
/// an object of strings.
pub fn to_map(text: &str) -> HashMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// A JSON object of strings, sorted by name, read and forgotten.
struct Object;

/// A JSON string, read and forgotten.
struct Text;

/// A name of an object, kept to compare with the next.
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                let mut last: Option<Name<'de>> = None;
                while let Some(name) = map.next_key::<Name<'de>>()? {
                    if last.as_ref().is_some_and(|last| last.0 >= name.0) {
                        return Err(A::Error::custom("names not sorted, or repeated"));
                    }
                    map.next_value::<Text>()?;
                    last = Some(name);
                }
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

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(name.to_owned())))
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
    fn only_sorted_objects_of_strings_pass() {
        for good in ["{}", r#"{"a":"b"}"#, r#" { "a" : "\u00e9\n" , "b":"" } "#, r#"{"\u0061b":"1","ac":"2"}"#] {
            assert!(is_object(good), "{good}");
        }
        let bad = [
            "",
            "[]",
            "null",
            r#""a""#,
            r#"{"a":1}"#,
            r#"{"a":null}"#,
            r#"{"a":{"b":"c"}}"#,
            "{",
            r#"{"a":"b"} x"#,
            "\u{feff}{}",
            r#"{"a":"1","a":"2"}"#,
            r#"{"b":"1","a":"2"}"#,
            r#"{"ab":"1","\u0061a":"2"}"#,
        ];
        for bad in bad {
            assert!(!is_object(bad), "{bad}");
        }
    }

    #[test]
    fn objects_read_back_as_maps() {
        let json = to_json(&[("a", "1"), ("b", "say \"hi\"")]);
        let map = to_map(&json);
        assert_eq!(map.len(), 2);
        assert_eq!((map["a"].as_str(), map["b"].as_str()), ("1", "say \"hi\""));
        assert!(to_map("not json").is_empty());
        assert!(to_map(r#"{"a":1}"#).is_empty());
    }
}
