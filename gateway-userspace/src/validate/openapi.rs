//! An OpenAPI 3.0/3.1 document attached to a route: its operations are compiled at load into
//! path templates, parameter checks and JSON body schemas, and each request is matched to one
//! operation by method and path. An operation the document does not declare can be refused, so
//! that undocumented ("shadow") endpoints of the upstream stay out of reach.
//!
//! What is checked: path parameters, query parameters (required, schema, no duplicates unless
//! the schema is an array), header parameters (required, schema) and the request body (media
//! type declared, required, JSON schema). Parameter values are text; they are turned into the
//! JSON type their schema declares (`integer`, `number`, `boolean`, `array` of those) before the
//! schema sees them. Schemas resolve `$ref`s into the document's `components` only: nothing is
//! fetched. For 3.0 documents `nullable` and boolean `exclusiveMinimum`/`exclusiveMaximum` are
//! rewritten to their JSON Schema 2020-12 equivalents. Cookie parameters and `servers` base
//! paths are not interpreted: operation paths are matched against the path as forwarded.
use std::path::Path;

use http::{HeaderMap, Method};
use jsonschema::Validator;
use serde_json::{Map, Value};

use super::{OperationMatch, Violation, compile_schema, json::first_error, query_pairs};

/// The compiled operations of one document, concrete paths before templated ones.
#[derive(Debug)]
pub(crate) struct OpenApi {
    operations: Vec<Operation>,
}

#[derive(Debug)]
struct Operation {
    method: Method,
    segments: Vec<Segment>,
    template: String,
    operation_id: Option<String>,
    params: Vec<Param>,
    body: Option<Body>,
}

#[derive(Clone, Debug)]
enum Segment {
    Literal(String),
    /// `{name}`, with literal text around it (`{id}.json`).
    Param {
        name: String,
        prefix: String,
        suffix: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Location {
    Path,
    Query,
    Header,
}

#[derive(Debug)]
struct Param {
    name: String,
    location: Location,
    required: bool,
    /// The declared `type` (`items.type` for arrays), to turn text into JSON.
    kind: Option<String>,
    array: bool,
    schema: Option<Validator>,
}

#[derive(Debug)]
struct Body {
    required: bool,
    /// Declared media types (`application/json`, `application/*`, `*/*`) and, for JSON ones,
    /// their compiled schema.
    media: Vec<(String, Option<Validator>)>,
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Loads a document: YAML when the file name ends in `.yaml`/`.yml`, JSON otherwise.
pub(crate) fn load(path: &Path) -> Result<OpenApi, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read file `{}`: {e}", path.display()))?;
    let yaml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    let doc: Value = if yaml {
        serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("`{}` is not valid YAML: {e}", path.display()))?
    } else {
        serde_json::from_str(&text)
            .map_err(|e| format!("`{}` is not valid JSON: {e}", path.display()))?
    };
    OpenApi::from_document(&doc).map_err(|e| format!("`{}`: {e}", path.display()))
}

impl OpenApi {
    pub(crate) fn from_document(doc: &Value) -> Result<OpenApi, String> {
        let version = doc
            .get("openapi")
            .and_then(Value::as_str)
            .ok_or("not an OpenAPI 3 document: no `openapi` version field")?;
        let v30 = if version.starts_with("3.0") {
            true
        } else if version.starts_with("3.1") {
            false
        } else {
            return Err(format!(
                "OpenAPI version `{version}` is not supported; use 3.0 or 3.1"
            ));
        };
        let mut components = doc.get("components").cloned().unwrap_or(Value::Null);
        if v30 {
            upgrade_30_schema(&mut components);
        }
        let compile = |schema: &Value, at: &str| -> Result<Validator, String> {
            let mut schema = schema.clone();
            if v30 {
                upgrade_30_schema(&mut schema);
            }
            // The schema sits under the document's own `components`, so `#/components/...`
            // references resolve as the document means them.
            let wrapper = serde_json::json!({
                "$ref": "#/x-gateway-schema",
                "x-gateway-schema": schema,
                "components": components,
            });
            compile_schema(&wrapper).map_err(|e| format!("schema at `{at}`: {e}"))
        };
        let paths = doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or("the document has no `paths` object")?;
        let mut operations = Vec::new();
        for (template, item) in paths {
            let item = resolve(doc, item)?;
            let segments = parse_template(template)?;
            let shared = item
                .get("parameters")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let at = format!("paths.{template}.{method}");
                let own = op
                    .get("parameters")
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice);
                let mut params: Vec<Param> = Vec::new();
                // Operation parameters override path-item ones with the same name and location.
                for raw in own.iter().chain(shared) {
                    let raw = resolve(doc, raw)?;
                    let name = raw
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("a parameter of `{at}` has no `name`"))?;
                    let location = match raw.get("in").and_then(Value::as_str) {
                        Some("path") => Location::Path,
                        Some("query") => Location::Query,
                        Some("header") => Location::Header,
                        Some("cookie") => continue,
                        _ => return Err(format!("parameter `{name}` of `{at}` has no valid `in`")),
                    };
                    // RFC: these three are governed by the operation, not parameters.
                    if location == Location::Header
                        && ["accept", "content-type", "authorization"]
                            .contains(&name.to_ascii_lowercase().as_str())
                    {
                        continue;
                    }
                    if params
                        .iter()
                        .any(|p| p.name == name && p.location == location)
                    {
                        continue;
                    }
                    let schema = raw.get("schema").map(|s| resolve(doc, s)).transpose()?;
                    let array = schema.is_some_and(|s| s.get("type") == Some(&"array".into()));
                    let kind_of =
                        |s: &Value| s.get("type").and_then(Value::as_str).map(str::to_owned);
                    let kind = schema.and_then(|s| {
                        if array {
                            s.get("items")
                                .map(|i| resolve(doc, i).ok().and_then(kind_of))?
                        } else {
                            kind_of(s)
                        }
                    });
                    params.push(Param {
                        name: name.to_owned(),
                        location,
                        required: location == Location::Path
                            || raw.get("required").and_then(Value::as_bool) == Some(true),
                        kind,
                        array,
                        schema: raw
                            .get("schema")
                            .map(|s| compile(s, &format!("{at} parameter `{name}`")))
                            .transpose()?,
                    });
                }
                for segment in &segments {
                    if let Segment::Param { name, .. } = segment
                        && !params
                            .iter()
                            .any(|p| &p.name == name && p.location == Location::Path)
                    {
                        return Err(format!(
                            "`{at}` does not declare its path parameter `{name}`"
                        ));
                    }
                }
                let body = match op.get("requestBody") {
                    None => None,
                    Some(raw) => {
                        let raw = resolve(doc, raw)?;
                        let mut media = Vec::new();
                        if let Some(content) = raw.get("content").and_then(Value::as_object) {
                            for (media_type, entry) in content {
                                let media_type = media_type.to_ascii_lowercase();
                                let schema = match entry.get("schema") {
                                    Some(schema) if is_json(&media_type) => Some(compile(
                                        schema,
                                        &format!("{at} requestBody `{media_type}`"),
                                    )?),
                                    _ => None,
                                };
                                media.push((media_type, schema));
                            }
                        }
                        Some(Body {
                            required: raw.get("required").and_then(Value::as_bool) == Some(true),
                            media,
                        })
                    }
                };
                operations.push(Operation {
                    method: Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                        .map_err(|e| e.to_string())?,
                    segments: segments.clone(),
                    template: template.clone(),
                    operation_id: op
                        .get("operationId")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    params,
                    body,
                });
            }
        }
        // OpenAPI: concrete paths match before templated ones.
        operations.sort_by_key(|op| {
            op.segments
                .iter()
                .filter(|s| matches!(s, Segment::Param { .. }))
                .count()
        });
        Ok(OpenApi { operations })
    }

    /// The operation declared for `method` and `path`, with its decoded path parameters.
    pub(crate) fn find(&self, method: &Method, path: &str) -> Option<OperationMatch> {
        let parts: Vec<&str> = path.split('/').collect();
        self.operations.iter().enumerate().find_map(|(index, op)| {
            if op.method != *method || op.segments.len() != parts.len() {
                return None;
            }
            let mut params = Vec::new();
            for (segment, part) in op.segments.iter().zip(&parts) {
                match segment {
                    Segment::Literal(literal) if literal == part => {}
                    Segment::Literal(_) => return None,
                    Segment::Param {
                        name,
                        prefix,
                        suffix,
                    } => {
                        let value = part.strip_prefix(prefix.as_str())?;
                        let value = value.strip_suffix(suffix.as_str())?;
                        if value.is_empty() {
                            return None;
                        }
                        params.push((name.clone(), super::percent_decode(value)));
                    }
                }
            }
            Some(OperationMatch {
                index,
                operation_id: op.operation_id.clone(),
                template: op.template.clone(),
                path_params: params,
            })
        })
    }

    /// Path, query and header parameters and the body's media type of a matched operation.
    pub(crate) fn check_head(
        &self,
        matched: &OperationMatch,
        query: Option<&str>,
        headers: &HeaderMap,
        media_type: Option<&str>,
    ) -> Result<(), Violation> {
        let op = &self.operations[matched.index];
        let pairs = query_pairs(query);
        for param in &op.params {
            let values: Vec<String> = match param.location {
                Location::Path => matched
                    .path_params
                    .iter()
                    .filter(|(n, _)| n == &param.name)
                    .map(|(_, v)| v.clone())
                    .collect(),
                Location::Query => pairs
                    .iter()
                    .filter(|(n, _)| n == &param.name)
                    .map(|(_, v)| v.clone())
                    .collect(),
                Location::Header => headers
                    .get_all(param.name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect(),
            };
            let place = match param.location {
                Location::Path => "path parameter",
                Location::Query => "query parameter",
                Location::Header => "header",
            };
            if values.is_empty() {
                if param.required {
                    return Err(Violation::parameter(
                        format!("{place} `{}` is required", param.name),
                        param.name.clone(),
                    ));
                }
                continue;
            }
            if values.len() > 1 && !param.array {
                return Err(Violation::parameter(
                    format!("{place} `{}` is given more than once", param.name),
                    param.name.clone(),
                ));
            }
            let Some(schema) = &param.schema else {
                continue;
            };
            let value = if param.array {
                Value::Array(
                    values
                        .iter()
                        .flat_map(|v| v.split(','))
                        .map(|v| typed(v, param.kind.as_deref()))
                        .collect(),
                )
            } else {
                typed(&values[0], param.kind.as_deref())
            };
            if let Some((pointer, rule)) = first_error(schema, &value) {
                // For arrays the pointer names the failing item (`/1`); scalars have none.
                let item = if pointer.is_empty() {
                    String::new()
                } else {
                    format!(" (item `{pointer}`)")
                };
                return Err(Violation::parameter(
                    format!("{place} `{}`{item} {rule}", param.name),
                    param.name.clone(),
                ));
            }
        }
        if let (Some(body), Some(media_type)) = (&op.body, media_type)
            && body_media(body, media_type).is_none()
        {
            return Err(Violation::unsupported_media_type(
                "the operation does not accept this content type",
            ));
        }
        Ok(())
    }

    /// Whether the matched operation requires a body, and the schema a JSON body must meet.
    pub(crate) fn body_rules(
        &self,
        matched: &OperationMatch,
        media_type: Option<&str>,
    ) -> (bool, Option<&Validator>) {
        let Some(body) = &self.operations[matched.index].body else {
            return (false, None);
        };
        let schema = media_type
            .and_then(|m| body_media(body, m))
            .and_then(|(_, s)| s.as_ref());
        (body.required, schema)
    }
}

/// The declared media type that `media_type` falls under: exact, then `type/*`, then `*/*`.
fn body_media<'a>(body: &'a Body, media_type: &str) -> Option<&'a (String, Option<Validator>)> {
    let main = media_type.split('/').next().unwrap_or("");
    let range = format!("{main}/*");
    body.media
        .iter()
        .find(|(m, _)| m == media_type)
        .or_else(|| body.media.iter().find(|(m, _)| *m == range))
        .or_else(|| body.media.iter().find(|(m, _)| m == "*/*"))
}

pub(crate) fn is_json(media_type: &str) -> bool {
    media_type == "application/json" || media_type.ends_with("+json")
}

/// A parameter's text as the JSON value its schema type expects; left a string when it does
/// not parse, so the schema reports the type error.
fn typed(text: &str, kind: Option<&str>) -> Value {
    let parsed = match kind {
        Some("integer") => text.parse::<i64>().ok().map(Value::from),
        Some("number") => text
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number),
        Some("boolean") => match text {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::String(text.to_owned()))
}

/// Follows a local `$ref` (`#/components/parameters/Id`) a few levels.
fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> Result<&'a Value, String> {
    for _ in 0..8 {
        let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
            return Ok(value);
        };
        let pointer = reference
            .strip_prefix('#')
            .ok_or_else(|| format!("`$ref` `{reference}` is not local; only `#/...` resolves"))?;
        value = doc
            .pointer(pointer)
            .ok_or_else(|| format!("`$ref` `{reference}` points at nothing"))?;
    }
    Err("`$ref`s nest more than 8 deep".to_owned())
}

fn parse_template(template: &str) -> Result<Vec<Segment>, String> {
    if !template.starts_with('/') {
        return Err(format!("path `{template}` does not start with `/`"));
    }
    template
        .split('/')
        .map(|part| match (part.find('{'), part.find('}')) {
            (None, None) => Ok(Segment::Literal(part.to_owned())),
            (Some(open), Some(close)) if open < close && part[close + 1..].find('{').is_none() => {
                Ok(Segment::Param {
                    name: part[open + 1..close].to_owned(),
                    prefix: part[..open].to_owned(),
                    suffix: part[close + 1..].to_owned(),
                })
            }
            _ => Err(format!(
                "path `{template}`: a segment may hold one `{{parameter}}`"
            )),
        })
        .collect()
}

/// OpenAPI 3.0's schema dialect differs from JSON Schema 2020-12 in two ways that change
/// results: `nullable: true` and boolean `exclusiveMinimum`/`exclusiveMaximum`. Rewrite them.
/// serde's parsers cap nesting at 128, so this recursion is bounded.
fn upgrade_30_schema(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true)) {
                nullable(map);
            }
            for (flag, bound) in [
                ("exclusiveMinimum", "minimum"),
                ("exclusiveMaximum", "maximum"),
            ] {
                match map.get(flag) {
                    Some(Value::Bool(true)) => {
                        if let Some(limit) = map.remove(bound) {
                            map.insert(flag.to_owned(), limit);
                        } else {
                            map.remove(flag);
                        }
                    }
                    Some(Value::Bool(false)) => {
                        map.remove(flag);
                    }
                    _ => {}
                }
            }
            map.values_mut().for_each(upgrade_30_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(upgrade_30_schema),
        _ => {}
    }
}

fn nullable(map: &mut Map<String, Value>) {
    match map.get_mut("type") {
        Some(Value::String(kind)) => {
            let kind = std::mem::take(kind);
            map.insert("type".to_owned(), serde_json::json!([kind, "null"]));
        }
        Some(Value::Array(kinds)) if !kinds.contains(&"null".into()) => kinds.push("null".into()),
        _ => {}
    }
    if let Some(Value::Array(options)) = map.get_mut("enum") {
        options.push(Value::Null);
    }
}
