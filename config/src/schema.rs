//! The JSON Schema of the routing language, generated from the `spec` types, and a Markdown
//! field reference generated from that schema for the README.

use std::fmt::Write;

use schemars::generate::SchemaSettings;
use serde_json::Value;

use crate::spec::MeshDocument;

/// The `$id` under which editors find the schema.
pub const SCHEMA_ID: &str = "https://sidemesh.io/schemas/mesh.schema.json";

/// The schema as committed in `config/mesh.schema.json` (pretty JSON with a final newline).
pub fn json_schema() -> String {
    let generator = SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<MeshDocument>();
    schema.insert("$id".into(), Value::String(SCHEMA_ID.into()));
    let mut out = serde_json::to_string_pretty(&schema).expect("a schema is always serialisable");
    out.push('\n');
    out
}

/// A Markdown table of every field: path, type and description.
pub fn field_reference() -> String {
    let schema: Value =
        serde_json::from_str(&json_schema()).expect("generated schema is valid JSON");
    let defs = schema.get("definitions").cloned().unwrap_or(Value::Null);
    let mut rows = Vec::new();
    walk(&schema, &defs, "", &mut rows, 0);
    let mut out = String::from("| field | type | description |\n|---|---|---|\n");
    for (path, ty, description) in rows {
        let description = description.replace('\n', " ").replace('|', "\\|");
        let _ = writeln!(out, "| `{path}` | {ty} | {description} |");
    }
    out
}

/// Follows `$ref`, `allOf: [$ref]` and `anyOf: [$ref, null]` (how an `Option` is written).
fn resolve<'a>(node: &'a Value, defs: &'a Value) -> &'a Value {
    let optional = node
        .get("anyOf")
        .and_then(Value::as_array)
        .and_then(|alts| {
            let mut non_null = alts
                .iter()
                .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"));
            match (non_null.next(), non_null.next()) {
                (Some(only), None) if alts.len() == 2 => Some(only),
                _ => None,
            }
        });
    if let Some(inner) = optional {
        return resolve(inner, defs);
    }
    let reference = node.get("$ref").or_else(|| {
        node.get("allOf")
            .and_then(|a| a.get(0))
            .and_then(|a| a.get("$ref"))
    });
    match reference.and_then(Value::as_str) {
        Some(r) => defs
            .get(r.trim_start_matches("#/definitions/"))
            .map_or(node, |d| resolve(d, defs)),
        None => node,
    }
}

fn type_name(node: &Value, defs: &Value) -> String {
    let node = resolve(node, defs);
    if let Some(values) = node.get("enum").and_then(Value::as_array) {
        let names: Vec<String> = values
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or("?")))
            .collect();
        return names.join(" \\| ");
    }
    if let Some(c) = node.get("const").and_then(Value::as_str) {
        return format!("`{c}`");
    }
    if let Some(variants) = node
        .get("oneOf")
        .or_else(|| node.get("anyOf"))
        .and_then(Value::as_array)
    {
        let names: Vec<String> = variants
            .iter()
            .map(|v| {
                match v
                    .get("required")
                    .and_then(|r| r.get(0))
                    .and_then(Value::as_str)
                {
                    Some(key) => format!("`{{{key}: …}}`"),
                    None => type_name(v, defs),
                }
            })
            .filter(|n| n != "null")
            .collect();
        return names.join(" \\| ");
    }
    match node.get("type") {
        Some(Value::String(t)) if t == "array" => {
            format!(
                "list of {}",
                node.get("items")
                    .map_or("any".into(), |i| type_name(i, defs))
            )
        }
        Some(Value::String(t)) => {
            let pattern = node
                .get("examples")
                .and_then(|e| e.get(0))
                .and_then(Value::as_str);
            match pattern {
                Some(example) => format!("{t} (e.g. `{example}`)"),
                None => t.clone(),
            }
        }
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "object".into(),
    }
}

fn walk(
    node: &Value,
    defs: &Value,
    prefix: &str,
    rows: &mut Vec<(String, String, String)>,
    depth: usize,
) {
    if depth > 8 {
        return;
    }
    let node = resolve(node, defs);
    let node = match node.get("type").and_then(Value::as_str) {
        Some("array") => node.get("items").map_or(node, |i| resolve(i, defs)),
        _ => node,
    };
    // Externally tagged enums with object variants (e.g. `consistentHash: {header}`).
    if let Some(variants) = node.get("oneOf").and_then(Value::as_array) {
        for v in variants {
            if let Some(props) = v.get("properties").and_then(Value::as_object) {
                for (key, value) in props {
                    walk_field(key, value, v, defs, prefix, rows, depth);
                }
            }
        }
    }
    let Some(props) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (key, value) in props {
        walk_field(key, value, node, defs, prefix, rows, depth);
    }
}

fn walk_field(
    key: &str,
    value: &Value,
    parent: &Value,
    defs: &Value,
    prefix: &str,
    rows: &mut Vec<(String, String, String)>,
    depth: usize,
) {
    let path = if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    };
    let required = parent
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|k| k == key));
    let description = value
        .get("description")
        .or_else(|| resolve(value, defs).get("description"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut ty = type_name(value, defs);
    if required {
        ty.push_str(", required");
    }
    let is_list = resolve(value, defs).get("type").and_then(Value::as_str) == Some("array");
    rows.push((path.clone(), ty, description.to_string()));
    let child = if is_list { format!("{path}[]") } else { path };
    walk(value, defs, &child, rows, depth + 1);
}
