//! The validate phase: checks a request against its route's `validate` table before the
//! upstream sees it: methods (405), content types (415), body size (413), JSON well-formedness
//! and nesting depth (400), query-parameter rules (400), a JSON Schema for bodies (422), and an
//! OpenAPI document's operations ([`openapi`]: parameters, body schema, undeclared operations
//! refused with 404). Every schema is compiled once, when the config loads.
//!
//! A [`Violation`] names what was wrong (a parameter the route declares, or the JSON pointer
//! of the failing body field) and the rule it broke, never the value the client sent.
//!
//! How the pipeline calls it (phase 7; `check_head` needs no body, so it may also run before
//! authorize to give it the OpenAPI path parameters):
//!
//! ```text
//! Validations::from_config(&config)?            once per config load or reload
//! validations.route(&route.name)                None: the route has no `validate` table, skip
//!   .check_head(&method, &uri, &headers)        uri as forwarded (normalised, prefix stripped)
//!       Err(v) → problem+json with v.status(), v.slug(), v.detail(), v.pointer()
//!       Ok(operation)                           keep it for check_body and authorize
//!   .body_limit(&headers, operation.as_ref())   Some(n): buffer the body, at most n bytes (more
//!                                               → Violation::body_too_large()), then
//!   .check_body(&bytes, &BodyContext::new(&headers, operation.as_ref()))
//!                                               None: stream the body as usual
//! ```
mod json;
mod openapi;

use std::collections::HashMap;

use http::{HeaderMap, Method, StatusCode, Uri, header};
use jsonschema::Validator;

use crate::config::{
    Config, ConfigError, RouteConfig,
    validate::{ParamType, QueryRules, RouteValidateConfig},
};

/// Every route's compiled validation, built from one config.
#[derive(Debug, Default)]
pub struct Validations {
    routes: HashMap<String, RouteValidation>,
}

impl Validations {
    /// Compiles every route's `validate` table (schemas, OpenAPI documents).
    pub fn from_config(config: &Config) -> Result<Validations, ConfigError> {
        let mut routes = HashMap::new();
        for (i, route) in config.routes.iter().enumerate() {
            if let Some(validate) = &route.validate {
                let key = format!("routes[{i}].validate");
                routes.insert(
                    route.name.clone(),
                    RouteValidation::new(validate, route, &key)?,
                );
            }
        }
        Ok(Validations { routes })
    }

    /// The checks of route `name`; `None` when the route has no `validate` table.
    pub fn route(&self, name: &str) -> Option<&RouteValidation> {
        self.routes.get(name)
    }
}

/// The OpenAPI operation a request matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationMatch {
    index: usize,
    /// The operation's `operationId`, if the document gives one.
    pub operation_id: Option<String>,
    /// The path template as the document writes it (`/orders/{id}`).
    pub template: String,
    /// Path parameters by name, percent-decoded.
    pub path_params: Vec<(String, String)>,
}

/// What [`RouteValidation::check_body`] needs besides the bytes.
#[derive(Clone, Copy, Debug)]
pub struct BodyContext<'a> {
    pub headers: &'a HeaderMap,
    /// What [`RouteValidation::check_head`] matched.
    pub operation: Option<&'a OperationMatch>,
}

impl<'a> BodyContext<'a> {
    pub fn new(headers: &'a HeaderMap, operation: Option<&'a OperationMatch>) -> BodyContext<'a> {
        BodyContext { headers, operation }
    }
}

/// A request that breaks its route's rules. `Display` is the detail, for logs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Violation {
    kind: ViolationKind,
    detail: String,
    pointer: Option<String>,
    parameter: Option<String>,
    allow: Vec<Method>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ViolationKind {
    MethodNotAllowed,
    UnsupportedMediaType,
    BodyTooLarge,
    BodyRequired,
    MalformedJson,
    TooDeep,
    Parameter,
    Schema,
    Undeclared,
}

impl Violation {
    fn new(kind: ViolationKind, detail: impl Into<String>) -> Violation {
        Violation {
            kind,
            detail: detail.into(),
            pointer: None,
            parameter: None,
            allow: Vec::new(),
        }
    }

    /// For the pipeline: a buffered body passed [`RouteValidation::body_limit`].
    pub fn body_too_large() -> Violation {
        Violation::new(
            ViolationKind::BodyTooLarge,
            "the request body is larger than this route accepts",
        )
    }

    fn unsupported_media_type(detail: &str) -> Violation {
        Violation::new(ViolationKind::UnsupportedMediaType, detail)
    }

    fn parameter(detail: String, name: String) -> Violation {
        Violation {
            parameter: Some(name),
            ..Violation::new(ViolationKind::Parameter, detail)
        }
    }

    fn schema(what: &'static str, pointer: String, rule: String) -> Violation {
        Violation {
            detail: format!("{what} field `{pointer}` {rule}"),
            pointer: Some(pointer),
            ..Violation::new(ViolationKind::Schema, "")
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            ViolationKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ViolationKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ViolationKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ViolationKind::BodyRequired
            | ViolationKind::MalformedJson
            | ViolationKind::TooDeep
            | ViolationKind::Parameter => StatusCode::BAD_REQUEST,
            ViolationKind::Schema => StatusCode::UNPROCESSABLE_ENTITY,
            ViolationKind::Undeclared => StatusCode::NOT_FOUND,
        }
    }

    /// A stable, short name for the problem type and the access log.
    pub fn slug(&self) -> &'static str {
        match self.kind {
            ViolationKind::MethodNotAllowed => "method-not-allowed",
            ViolationKind::UnsupportedMediaType => "unsupported-media-type",
            ViolationKind::BodyTooLarge => "body-too-large",
            ViolationKind::BodyRequired => "body-required",
            ViolationKind::MalformedJson => "malformed-json",
            ViolationKind::TooDeep => "json-too-deep",
            ViolationKind::Parameter => "invalid-parameter",
            ViolationKind::Schema => "schema-violation",
            ViolationKind::Undeclared => "undeclared-operation",
        }
    }

    /// What was wrong, safe for the problem body's `detail`: it names declared parameters,
    /// pointers and rules, never a value from the request.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The JSON pointer (RFC 9457's `#/field/0` form) of the failing body field, if any.
    pub fn pointer(&self) -> Option<&str> {
        self.pointer.as_deref()
    }

    /// The declared parameter or header that failed, if any.
    pub fn parameter_name(&self) -> Option<&str> {
        self.parameter.as_deref()
    }

    /// For 405: the methods for the `Allow` header.
    pub fn allow(&self) -> &[Method] {
        &self.allow
    }
}

/// One route's compiled checks.
#[derive(Debug)]
pub struct RouteValidation {
    methods: Vec<Method>,
    content_types: Vec<String>,
    max_body_bytes: u64,
    json_max_depth: u32,
    json_max_bytes: u64,
    json_schema: Option<Validator>,
    query: QueryRules,
    openapi: Option<openapi::OpenApi>,
    reject_undeclared: bool,
}

/// Compiles a JSON Schema as draft 2020-12, with no resolver beyond the schema itself.
pub(crate) fn compile_schema(schema: &serde_json::Value) -> Result<Validator, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())
}

impl RouteValidation {
    /// Compiles one route's table; errors name `key`'s sub-keys.
    pub fn new(
        config: &RouteValidateConfig,
        route: &RouteConfig,
        key: &str,
    ) -> Result<RouteValidation, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            message,
        };
        let json_schema = match &config.json_schema {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "json_schema",
                        format!("cannot read file `{}`: {e}", path.display()),
                    )
                })?;
                let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    invalid(
                        "json_schema",
                        format!("`{}` is not valid JSON: {e}", path.display()),
                    )
                })?;
                Some(compile_schema(&schema).map_err(|e| {
                    invalid(
                        "json_schema",
                        format!(
                            "`{}` is not a valid JSON Schema (draft 2020-12): {e}",
                            path.display()
                        ),
                    )
                })?)
            }
        };
        let openapi = config
            .openapi
            .as_deref()
            .map(openapi::load)
            .transpose()
            .map_err(|e| invalid("openapi", e))?;
        let max_body_bytes = config.max_body_bytes.unwrap_or(route.max_body_bytes);
        Ok(RouteValidation {
            methods: config
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            content_types: config.content_types.clone(),
            max_body_bytes,
            json_max_depth: config.json_max_depth,
            json_max_bytes: config.json_max_bytes.unwrap_or(max_body_bytes),
            json_schema,
            query: config.query.clone(),
            openapi,
            reject_undeclared: config.reject_undeclared,
        })
    }

    /// Everything that can be checked before the body arrives: method, content type, declared
    /// length, query rules and, with an OpenAPI document, the operation and its parameters.
    pub fn check_head(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Option<OperationMatch>, Violation> {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(Violation {
                allow: self.methods.clone(),
                ..Violation::new(
                    ViolationKind::MethodNotAllowed,
                    format!("this resource does not accept {method}"),
                )
            });
        }
        let media = media_type(headers);
        if let Some(media) = &media {
            self.check_media_type(media)?;
        } else if !self.content_types.is_empty() && announces_body(headers) {
            return Err(Violation::unsupported_media_type(
                "the request body has no content type",
            ));
        }
        if let Some(length) = content_length(headers)
            && length > self.max_body_bytes
        {
            return Err(Violation::body_too_large());
        }
        self.check_query(uri.query())?;
        let Some(doc) = &self.openapi else {
            return Ok(None);
        };
        let Some(matched) = doc.find(method, uri.path()) else {
            if self.reject_undeclared {
                return Err(Violation::new(
                    ViolationKind::Undeclared,
                    "no documented operation matches this method and path",
                ));
            }
            return Ok(None);
        };
        let body_media = media.as_deref().filter(|_| announces_body(headers));
        doc.check_head(&matched, uri.query(), headers, body_media)?;
        Ok(Some(matched))
    }

    fn check_media_type(&self, media: &str) -> Result<(), Violation> {
        if !self.content_types.is_empty() && !self.content_types.iter().any(|c| c == media) {
            return Err(Violation::unsupported_media_type(
                "this route does not accept the request's content type",
            ));
        }
        if self.json_schema.is_some() && !openapi::is_json(media) {
            return Err(Violation::unsupported_media_type(
                "this route takes JSON request bodies",
            ));
        }
        Ok(())
    }

    fn check_query(&self, query: Option<&str>) -> Result<(), Violation> {
        let rules = &self.query;
        if rules.required.is_empty() && rules.allowed.is_none() && rules.types.is_empty() {
            return Ok(());
        }
        let pairs = query_pairs(query);
        for name in &rules.required {
            if !pairs.iter().any(|(n, _)| n == name) {
                return Err(Violation::parameter(
                    format!("query parameter `{name}` is required"),
                    name.clone(),
                ));
            }
        }
        if let Some(allowed) = &rules.allowed {
            let known = |n: &String| {
                allowed.contains(n) || rules.required.contains(n) || rules.types.contains_key(n)
            };
            if pairs.iter().any(|(n, _)| !known(n)) {
                // The unknown name is the client's text: not repeated back.
                return Err(Violation::new(
                    ViolationKind::Parameter,
                    "the query has a parameter this route does not allow",
                ));
            }
        }
        for (name, kind) in &rules.types {
            for (_, value) in pairs.iter().filter(|(n, _)| n == name) {
                let ok = match kind {
                    ParamType::String => true,
                    ParamType::Integer => value.parse::<i64>().is_ok(),
                    ParamType::Number => value.parse::<f64>().is_ok_and(f64::is_finite),
                    ParamType::Boolean => value == "true" || value == "false",
                };
                if !ok {
                    let kind = match kind {
                        ParamType::String => "a string",
                        ParamType::Integer => "an integer",
                        ParamType::Number => "a number",
                        ParamType::Boolean => "`true` or `false`",
                    };
                    return Err(Violation::parameter(
                        format!("query parameter `{name}` must be {kind}"),
                        name.clone(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `Some(limit)` when [`check_body`](Self::check_body) must see this request's body: it is
    /// JSON (or has no declared type, so only its bytes tell), or the operation requires one.
    /// `None`: stream it as usual.
    pub fn body_limit(
        &self,
        headers: &HeaderMap,
        operation: Option<&OperationMatch>,
    ) -> Option<u64> {
        let media = media_type(headers);
        let json = media.as_deref().is_some_and(openapi::is_json);
        let required = match (&self.openapi, operation) {
            (Some(doc), Some(op)) => doc.body_rules(op, media.as_deref()).0,
            _ => false,
        };
        (json || media.is_none() || required).then_some(self.max_body_bytes)
    }

    /// The buffered body: size, presence, JSON depth (measured before parsing), well-formedness,
    /// then the route's JSON Schema and the operation's body schema.
    pub fn check_body(&self, body: &[u8], ctx: &BodyContext<'_>) -> Result<(), Violation> {
        if u64::try_from(body.len()).unwrap_or(u64::MAX) > self.max_body_bytes {
            return Err(Violation::body_too_large());
        }
        let media = media_type(ctx.headers);
        let (required, operation_schema) = match (&self.openapi, ctx.operation) {
            (Some(doc), Some(op)) => doc.body_rules(op, media.as_deref()),
            _ => (false, None),
        };
        if body.is_empty() {
            if required {
                return Err(Violation::new(
                    ViolationKind::BodyRequired,
                    "this operation requires a request body",
                ));
            }
            return Ok(());
        }
        let Some(media) = media else {
            if self.content_types.is_empty() && self.json_schema.is_none() {
                return Ok(());
            }
            return Err(Violation::unsupported_media_type(
                "the request body has no content type",
            ));
        };
        if !openapi::is_json(&media) {
            return Ok(());
        }
        if u64::try_from(body.len()).unwrap_or(u64::MAX) > self.json_max_bytes {
            return Err(Violation::body_too_large());
        }
        if let Err(limit) = json::depth_within(body, self.json_max_depth) {
            return Err(Violation::new(
                ViolationKind::TooDeep,
                format!("the JSON body nests deeper than {limit} levels"),
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            // Line and column only: serde's message can quote the offending input.
            Violation::new(
                ViolationKind::MalformedJson,
                format!(
                    "the body is not well-formed JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        if let Some(schema) = &self.json_schema {
            json::check_schema(schema, &value, "body")?;
        }
        if let Some(schema) = operation_schema {
            json::check_schema(schema, &value, "body")?;
        }
        Ok(())
    }
}

/// The request's media type: lowercase `type/subtype`, parameters dropped.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next()?.trim().to_ascii_lowercase();
    (!essence.is_empty()).then_some(essence)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the head says a body follows (HTTP/2 may send one without either header; the body
/// checks then look at the bytes).
fn announces_body(headers: &HeaderMap) -> bool {
    content_length(headers).is_some_and(|n| n > 0)
        || headers.contains_key(header::TRANSFER_ENCODING)
}

/// `a=1&b=x+y` as decoded (name, value) pairs; `+` is a space, as forms write it.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(&name.replace('+', " ")),
                percent_decode(&value.replace('+', " ")),
            )
        })
        .collect()
}

/// Decodes `%XX` escapes; a broken escape stays as written, invalid UTF-8 becomes U+FFFD.
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
