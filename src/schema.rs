//! JSON Schemas of the config repo's TOML files, for editors and CI (`rustygate schema`).

use schemars::{Schema, schema_for};
use serde_json::{Value, json};

use crate::config::raw::{GatewayFile, RoutesFile, UpstreamsFile};

/// The kinds of file in a config repo, with the schema of each.
pub fn schemas() -> Vec<(&'static str, Schema)> {
    vec![
        ("gateway", schema_for!(GatewayFile)),
        ("routes", schema_for!(RoutesFile)),
        ("upstreams", schema_for!(UpstreamsFile)),
    ]
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
        "description": "gateway.toml, routes/*.toml or upstreams/*.toml of a RustyGate config repo.",
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
