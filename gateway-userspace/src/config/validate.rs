//! The validate phase's part of the config file: each route's `validate` table. Schema and
//! OpenAPI files are compiled here, at load, by [`crate::validate::RouteValidation::new`], so a
//! broken file is refused with the key that names it and a reload picks up edited files.
//!
//! ```toml
//! [routes.validate]
//! methods = ["GET", "POST"]                 # others: 405
//! content_types = ["application/json"]      # others: 415
//! max_body_bytes = 65536                    # larger: 413
//! json_max_depth = 32                       # deeper: 400, measured before parsing
//! json_schema = "/etc/gateway/order.schema.json"
//! openapi = "/etc/gateway/orders.openapi.yaml"
//! reject_undeclared = true                  # operations the document lacks: 404
//! [routes.validate.query]
//! required = ["page"]
//! allowed = ["page", "limit"]
//! types = { page = "integer", limit = "integer" }
//! ```
use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

use super::{ConfigError, RouteConfig, invalid};

/// serde_json refuses deeper documents itself; a larger limit could never be reached.
pub const MAX_JSON_DEPTH: u32 = 128;

/// A route's request validation. Every check is optional; the table's presence alone turns on
/// JSON well-formedness and depth checks for JSON bodies.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteValidateConfig {
    /// Methods this route serves; others are answered 405 with an `Allow` header. Unlike the
    /// route's own `methods` (which decide whether the route matches at all, else 404), these
    /// tell the client the resource exists. Default: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Media types a request body may have (`application/json`, `text/csv`; parameters such as
    /// `charset` are ignored when matching). A body of another type, or without a type, is
    /// answered 415. Default: any.
    #[serde(default)]
    pub content_types: Vec<String>,
    /// Largest body buffered for validation; then 413. Default: the route's `max_body_bytes`,
    /// which it may not exceed.
    pub max_body_bytes: Option<u64>,
    /// Deepest nesting of JSON arrays and objects; then 400. Measured by scanning the bytes
    /// before anything parses them. Default 32, at most 128.
    #[serde(default = "default_json_max_depth")]
    pub json_max_depth: u32,
    /// Largest JSON body; then 413. Default: `max_body_bytes`.
    pub json_max_bytes: Option<u64>,
    /// A JSON Schema (draft 2020-12) file that JSON bodies must satisfy; then 422 naming the
    /// failing field's JSON pointer. Only `$ref`s within the file resolve: nothing is fetched.
    pub json_schema: Option<PathBuf>,
    /// Query-parameter rules.
    #[serde(default)]
    pub query: QueryRules,
    /// An OpenAPI 3.0 or 3.1 document (JSON, or YAML when the file name ends in `.yaml` or
    /// `.yml`) describing the upstream API. Requests are checked against the operation that
    /// matches their method and path (the path as forwarded, after `strip_prefix`): path,
    /// query and header parameters, and the JSON body schema.
    pub openapi: Option<PathBuf>,
    /// With `openapi`: answer 404 to operations the document does not declare, so undocumented
    /// ("shadow") endpoints cannot be reached through the gateway. Default `false`.
    #[serde(default)]
    pub reject_undeclared: bool,
}

fn default_json_max_depth() -> u32 {
    32
}

/// Rules on the query string, applied before any OpenAPI parameter checks.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRules {
    /// Parameters that must be present.
    #[serde(default)]
    pub required: Vec<String>,
    /// When set, the only parameters allowed (`required` and `types` names are added).
    pub allowed: Option<Vec<String>>,
    /// The type each named parameter's value must have.
    #[serde(default)]
    pub types: BTreeMap<String, ParamType>,
}

/// A simple type for a query parameter's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    /// A decimal integer that fits in 64 bits.
    Integer,
    /// A finite decimal number.
    Number,
    /// `true` or `false`.
    Boolean,
}

impl RouteValidateConfig {
    /// Checks one route's table and compiles its schemas; `key` is `routes[i].validate`.
    pub(crate) fn validate(&self, key: &str, route: &RouteConfig) -> Result<(), ConfigError> {
        for (j, method) in self.methods.iter().enumerate() {
            if http::Method::from_bytes(method.as_bytes()).is_err()
                || !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-')
            {
                return Err(invalid(
                    &format!("{key}.methods[{j}]"),
                    format!("`{method}` is not a method; write it in capitals, like `GET`"),
                ));
            }
        }
        for (j, media) in self.content_types.iter().enumerate() {
            let ok = media.split_once('/').is_some_and(|(t, s)| {
                !t.is_empty()
                    && !s.is_empty()
                    && media
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"/!#$&-^_.+*".contains(&b))
            });
            if !ok || media.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(invalid(
                    &format!("{key}.content_types[{j}]"),
                    format!(
                        "`{media}` is not a media type; write `type/subtype` in lowercase without parameters, like `application/json`"
                    ),
                ));
            }
        }
        if let Some(max) = self.max_body_bytes
            && (max == 0 || max > route.max_body_bytes)
        {
            return Err(invalid(
                &format!("{key}.max_body_bytes"),
                format!(
                    "must be between 1 and the route's `max_body_bytes` ({})",
                    route.max_body_bytes
                ),
            ));
        }
        if !(1..=MAX_JSON_DEPTH).contains(&self.json_max_depth) {
            return Err(invalid(
                &format!("{key}.json_max_depth"),
                format!("must be between 1 and {MAX_JSON_DEPTH}"),
            ));
        }
        if self.json_max_bytes == Some(0) {
            return Err(invalid(
                &format!("{key}.json_max_bytes"),
                "must be at least 1",
            ));
        }
        for (j, name) in self.query.required.iter().enumerate() {
            if name.is_empty() {
                return Err(invalid(
                    &format!("{key}.query.required[{j}]"),
                    "must not be empty",
                ));
            }
        }
        if self.reject_undeclared && self.openapi.is_none() {
            return Err(invalid(
                &format!("{key}.reject_undeclared"),
                "needs an `openapi` document that declares the operations",
            ));
        }
        crate::validate::RouteValidation::new(self, route, key).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn route(validate: &str) -> String {
        format!(
            "[[routes]]\nname = \"r\"\nupstream = \"u\"\n[routes.validate]\n{validate}\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n"
        )
    }

    fn error(toml: &str) -> String {
        match Config::parse(toml) {
            Ok(_) => panic!("config should be refused:\n{toml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let message = error(&route("json_schema = \"/nonexistent/schema.json\""));
        assert!(
            message.contains("`routes[0].validate.json_schema`")
                && message.contains("cannot read file"),
            "{message}"
        );
        let message = error(&route("json_max_depth = 1000"));
        assert!(
            message.contains("`routes[0].validate.json_max_depth`"),
            "{message}"
        );
        let message = error(&route("content_types = [\"Application/JSON\"]"));
        assert!(
            message.contains("`routes[0].validate.content_types[0]`"),
            "{message}"
        );
        let message = error(&route("reject_undeclared = true"));
        assert!(
            message.contains("`routes[0].validate.reject_undeclared`"),
            "{message}"
        );
        let message = error(&route("max_body_bytes = 99999999999"));
        assert!(
            message.contains("`routes[0].validate.max_body_bytes`"),
            "{message}"
        );
    }

    #[test]
    fn query_rules_parse() {
        let config = Config::parse(&route(
            "[routes.validate.query]\nrequired = [\"page\"]\ntypes = { page = \"integer\" }",
        ))
        .unwrap_or_else(|e| panic!("config: {e}"));
        let validate = config.routes[0].validate.as_ref().expect("validate table");
        assert_eq!(validate.query.required, ["page"]);
        assert_eq!(validate.json_max_depth, 32);
    }
}
