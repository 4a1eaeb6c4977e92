//! JSON Schemas of the config repo's TOML files, for editors and CI (`rustygate schema`).

use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};

use crate::config::raw::{GatewayFile, RoutesFile, UpstreamsFile};
use crate::testing::TestsFile;

/// The kinds of file in a config repo, with the schema of each.
pub fn schemas() -> Vec<(&'static str, Schema)> {
    vec![
        ("gateway", schema_of::<GatewayFile>()),
        ("routes", schema_of::<RoutesFile>()),
        ("upstreams", schema_of::<UpstreamsFile>()),
        ("tests", schema_of::<TestsFile>()),
    ]
}

fn schema_of<T: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12()
        .with_transform(RecursiveTransform(drop_null))
        .into_generator()
        .into_root_schema_for::<T>()
}

/// TOML has no null: a value is left out by leaving out its key. Without this, every optional
/// field's schema reads `anyOf: [X, {type: null}]` and editors show the null branch's (empty) docs.
fn drop_null(schema: &mut Schema) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(types)) = obj.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            obj.insert("type".into(), only);
        }
    }
    let null = json!({ "type": "null" });
    if let Some(Value::Array(any)) = obj.get_mut("anyOf") {
        any.retain(|s| *s != null);
        if let [Value::Object(_)] = any.as_slice()
            && let Some(Value::Object(only)) = any.pop()
        {
            obj.remove("anyOf");
            for (k, v) in only {
                obj.entry(k).or_insert(v);
            }
        }
    }
}

/// One schema naming each file kind in `$defs`; any config file validates against it.
pub fn combined() -> Value {
    let mut defs = serde_json::Map::new();
    let mut any_of = Vec::new();
    for (name, schema) in schemas() {
        let mut v = schema.to_value();
        if let Some(obj) = v.as_object_mut() {
            obj.remove("$schema");
            if let Some(Value::Object(inner)) = obj.remove("$defs") {
                for (k, d) in inner {
                    defs.insert(k, d);
                }
            }
        }
        any_of.push(json!({ "$ref": format!("#/$defs/{name}_file") }));
        defs.insert(format!("{name}_file"), v);
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "RustyGate config repo file",
        "description": "gateway.toml, routes/*.toml, upstreams/*.toml or tests/*.toml of a RustyGate config repo.",
        "anyOf": any_of,
        "$defs": defs,
    })
}

/// Pretty JSON text, as committed under `schema/`.
pub fn render(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_have_no_null_branch() {
        let text = render(&combined());
        assert!(!text.contains("null"), "TOML cannot write null:\n{text}");
        let routes = schema_of::<RoutesFile>().to_value();
        let host = &routes["$defs"]["RawRoute"]["properties"]["host"];
        assert_eq!(host["type"], "string");
        assert!(host["description"].is_string());
    }
}
