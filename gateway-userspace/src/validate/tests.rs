use std::path::{Path, PathBuf};

use crate::testing::headers;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::*;
use crate::config::Config;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/validate/testdata")
        .join(name)
}

/// A route `orders` with this `validate` table, through the real config parser and validation.
fn route(validate: &str) -> RouteValidation {
    let toml = format!(
        "[[routes]]\nname = \"orders\"\nupstream = \"u\"\nmax_body_bytes = 65536\n[routes.validate]\n{validate}\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n"
    );
    let config = Config::parse(&toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
    let validations = Validations::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let Some(route) = validations.routes.into_values().next() else {
        panic!("the route has a validate table");
    };
    route
}

fn uri(text: &str) -> Uri {
    text.parse()
        .unwrap_or_else(|e| panic!("test uri `{text}`: {e}"))
}

fn json_headers() -> HeaderMap {
    headers(&[("content-type", "application/json; charset=utf-8")])
}

/// `check_head` then `check_body`, as the pipeline runs them.
fn check(
    validation: &RouteValidation,
    method: Method,
    target: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<OperationMatch>, Violation> {
    let operation = validation.check_head(&method, &uri(target), headers)?;
    if validation.body_limit(headers, operation.as_ref()).is_some() {
        validation.check_body(body, &BodyContext::new(headers, operation.as_ref()))?;
    }
    Ok(operation)
}

fn violation(result: Result<Option<OperationMatch>, Violation>, what: &str) -> Violation {
    match result {
        Ok(matched) => panic!("{what}: expected a violation, got {matched:?}"),
        Err(violation) => violation,
    }
}

#[test]
fn methods_outside_the_list_get_405_with_allow() {
    let validation = route("methods = [\"GET\", \"POST\"]");
    let v = violation(
        check(
            &validation,
            Method::DELETE,
            "/orders",
            &HeaderMap::new(),
            b"",
        ),
        "DELETE",
    );
    assert_eq!(v.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v.allow(), [Method::GET, Method::POST]);
    check(&validation, Method::GET, "/orders", &HeaderMap::new(), b"")
        .unwrap_or_else(|e| panic!("GET is allowed: {e}"));
}

#[test]
fn a_wrong_content_type_gets_415() {
    let validation = route("content_types = [\"application/json\"]");
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &headers(&[("content-type", "text/plain"), ("content-length", "2")]),
            b"hi",
        ),
        "text/plain",
    );
    assert_eq!(v.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &headers(&[("content-length", "2")]),
            b"{}",
        ),
        "no content type",
    );
    assert_eq!(v.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Parameters and case do not matter.
    check(
        &validation,
        Method::POST,
        "/orders",
        &headers(&[("content-type", "Application/JSON; charset=utf-8")]),
        b"{}",
    )
    .unwrap_or_else(|e| panic!("JSON with a charset: {e}"));
    // A schema implies JSON.
    let validation = route(&format!(
        "json_schema = {:?}",
        testdata("order.schema.json").display().to_string()
    ));
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &headers(&[("content-type", "application/xml")]),
            b"<order/>",
        ),
        "xml for a JSON schema",
    );
    assert_eq!(v.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[test]
fn an_oversized_body_gets_413_by_length_and_by_bytes() {
    let validation = route("max_body_bytes = 16\njson_max_bytes = 8");
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &headers(&[
                ("content-type", "application/json"),
                ("content-length", "17"),
            ]),
            b"",
        ),
        "declared length",
    );
    assert_eq!(v.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &json_headers(),
            &[b' '; 17],
        ),
        "buffered bytes",
    );
    assert_eq!(v.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &json_headers(),
            br#"{"a":"12345"}"#,
        ),
        "over json_max_bytes",
    );
    assert_eq!(v.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        validation.body_limit(&json_headers(), None),
        Some(16),
        "the pipeline buffers at most max_body_bytes"
    );
}

#[test]
fn thousand_deep_json_is_refused_before_parsing() {
    let validation = route("");
    let body = "[".repeat(1_000) + &"]".repeat(1_000);
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &json_headers(),
            body.as_bytes(),
        ),
        "1,000-deep array",
    );
    assert_eq!(v.status(), StatusCode::BAD_REQUEST);
    assert_eq!(v.slug(), "json-too-deep");
    assert!(v.detail().contains("32"), "{v}");
    // Also unbalanced and as objects: the scan stops at the limit.
    let objects = r#"{"a":"#.repeat(10_000);
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &json_headers(),
            objects.as_bytes(),
        ),
        "10,000-deep objects",
    );
    assert_eq!(v.slug(), "json-too-deep");
}

#[test]
fn malformed_json_gets_400_without_echoing_it() {
    let validation = route("");
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &json_headers(),
            br#"{"password": "hunter2", oops}"#,
        ),
        "malformed",
    );
    assert_eq!(v.status(), StatusCode::BAD_REQUEST);
    assert_eq!(v.slug(), "malformed-json");
    assert!(
        !v.detail().contains("oops") && !v.detail().contains("hunter2"),
        "{v}"
    );
    // Non-JSON bodies are not parsed.
    check(
        &validation,
        Method::POST,
        "/orders",
        &headers(&[("content-type", "text/plain")]),
        b"{not json",
    )
    .unwrap_or_else(|e| panic!("text is not JSON's business: {e}"));
}

fn order_route() -> RouteValidation {
    route(&format!(
        "json_schema = {:?}",
        testdata("order.schema.json").display().to_string()
    ))
}

fn post_order(validation: &RouteValidation, body: serde_json::Value) -> Result<(), Violation> {
    check(
        validation,
        Method::POST,
        "/orders",
        &json_headers(),
        body.to_string().as_bytes(),
    )
    .map(drop)
}

fn good_order() -> serde_json::Value {
    serde_json::json!({
        "customer": {"id": 7, "email": "ann@example.com"},
        "items": [{"sku": "ABC-1", "qty": 2, "unit_price": 9.5}],
        "priority": "high",
    })
}

#[test]
fn schema_violations_get_422_with_the_failing_pointer() {
    let validation = order_route();
    post_order(&validation, good_order()).unwrap_or_else(|e| panic!("a good order: {e}"));

    let mut wrong_type = good_order();
    wrong_type["items"][0]["qty"] = serde_json::json!("two-secret");
    let v = post_order(&validation, wrong_type).expect_err("qty as a string");
    assert_eq!(v.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v.pointer(), Some("#/items/0/qty"));
    assert!(v.detail().contains("integer"), "{v}");
    assert!(!v.detail().contains("two-secret"), "{v}");

    let mut missing = good_order();
    missing["customer"]
        .as_object_mut()
        .expect("customer object")
        .remove("email");
    let v = post_order(&validation, missing).expect_err("email missing");
    assert_eq!(v.pointer(), Some("#/customer"));
    assert!(v.detail().contains("`email`"), "{v}");

    let mut extra = good_order();
    extra["customer"]["is_admin"] = serde_json::json!(true);
    let v = post_order(&validation, extra).expect_err("extra field");
    assert_eq!(v.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v.pointer(), Some("#/customer"));
    assert!(
        v.detail().contains("does not allow") && !v.detail().contains("is_admin"),
        "{v}"
    );

    let mut bad_enum = good_order();
    bad_enum["priority"] = serde_json::json!("urgent-secret");
    let v = post_order(&validation, bad_enum).expect_err("enum");
    assert_eq!(v.pointer(), Some("#/priority"));
    assert!(!v.detail().contains("urgent-secret"), "{v}");

    let mut bad_format = good_order();
    bad_format["customer"]["email"] = serde_json::json!("not-an-address");
    let v = post_order(&validation, bad_format).expect_err("format");
    assert_eq!(v.pointer(), Some("#/customer/email"));
}

#[test]
fn query_rules_check_presence_names_and_types() {
    let validation = route(
        "[routes.validate.query]\nrequired = [\"page\"]\nallowed = [\"sort\"]\ntypes = { page = \"integer\", exact = \"boolean\" }",
    );
    let get = |target: &str| check(&validation, Method::GET, target, &HeaderMap::new(), b"");
    get("/orders?page=2&sort=asc&exact=true").unwrap_or_else(|e| panic!("all good: {e}"));
    let v = violation(get("/orders?sort=asc"), "page missing");
    assert_eq!(v.status(), StatusCode::BAD_REQUEST);
    assert_eq!(v.parameter_name(), Some("page"));
    let v = violation(get("/orders?page=two"), "page not an integer");
    assert!(v.detail().contains("integer"), "{v}");
    assert!(!v.detail().contains("two"), "{v}");
    let v = violation(get("/orders?page=1&debug=1"), "unknown parameter");
    assert!(!v.detail().contains("debug"), "{v}");
    let v = violation(get("/orders?page=1&exact=yes"), "not a boolean");
    assert_eq!(v.parameter_name(), Some("exact"));
}

fn openapi_route(reject_undeclared: bool) -> RouteValidation {
    route(&format!(
        "openapi = {:?}\nreject_undeclared = {reject_undeclared}",
        testdata("orders.openapi.yaml").display().to_string()
    ))
}

#[test]
fn undeclared_openapi_operations_get_404() {
    let validation = openapi_route(true);
    for (method, target) in [
        (Method::GET, "/internal/debug"),
        (Method::DELETE, "/orders/7"),
        (Method::GET, "/orders/7/secrets"),
        (Method::GET, "/orders/"),
    ] {
        let v = violation(
            check(&validation, method.clone(), target, &HeaderMap::new(), b""),
            target,
        );
        assert_eq!(v.status(), StatusCode::NOT_FOUND, "{method} {target}");
        assert_eq!(v.slug(), "undeclared-operation");
    }
    let matched = check(
        &validation,
        Method::GET,
        "/orders/7",
        &HeaderMap::new(),
        b"",
    )
    .unwrap_or_else(|e| panic!("getOrder: {e}"))
    .expect("an operation");
    assert_eq!(matched.operation_id.as_deref(), Some("getOrder"));
    assert_eq!(matched.template, "/orders/{id}");
    assert_eq!(matched.path_params, [("id".to_owned(), "7".to_owned())]);

    // Without `reject_undeclared`, undeclared operations pass unchecked.
    let lenient = openapi_route(false);
    let matched = check(
        &lenient,
        Method::GET,
        "/internal/debug",
        &HeaderMap::new(),
        b"",
    )
    .unwrap_or_else(|e| panic!("lenient: {e}"));
    assert_eq!(matched, None);
}

#[test]
fn concrete_paths_match_before_templates() {
    let validation = openapi_route(true);
    let matched = check(
        &validation,
        Method::GET,
        "/orders/export.csv",
        &HeaderMap::new(),
        b"",
    )
    .unwrap_or_else(|e| panic!("export: {e}"))
    .expect("an operation");
    assert_eq!(matched.operation_id.as_deref(), Some("exportOrders"));
}

#[test]
fn openapi_parameters_are_checked() {
    let validation = openapi_route(true);
    let get = |target: &str| check(&validation, Method::GET, target, &HeaderMap::new(), b"");
    let v = violation(get("/orders/0"), "id below minimum");
    assert_eq!(v.status(), StatusCode::BAD_REQUEST);
    assert_eq!(v.parameter_name(), Some("id"));
    let v = violation(get("/orders/abc"), "id not an integer");
    assert!(v.detail().contains("integer"), "{v}");
    get("/orders?limit=10&status=open&status=shipped")
        .unwrap_or_else(|e| panic!("good query: {e}"));
    let v = violation(get("/orders?limit=1000"), "limit above maximum");
    assert_eq!(v.parameter_name(), Some("limit"));
    assert_eq!(
        v.detail(),
        "query parameter `limit` is greater than the maximum 100"
    );
    let v = violation(get("/orders?limit=1&limit=2"), "duplicate scalar");
    assert!(v.detail().contains("more than once"), "{v}");
    let v = violation(
        get("/orders?status=open&status=lost"),
        "array item not in enum",
    );
    assert_eq!(v.parameter_name(), Some("status"));
    assert_eq!(
        v.detail(),
        "query parameter `status` (item `/1`) is not one of the allowed values"
    );
}

#[test]
fn openapi_bodies_and_headers_are_checked() {
    let validation = openapi_route(true);
    let with_key = headers(&[
        ("content-type", "application/json"),
        ("idempotency-key", "0123456789"),
    ]);
    let body =
        serde_json::json!({"customer_id": 1, "coupon": null, "items": [{"sku": "A", "qty": 1}]});
    check(
        &validation,
        Method::POST,
        "/orders",
        &with_key,
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("a good order (3.0 nullable coupon): {e}"));

    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &json_headers(),
            body.to_string().as_bytes(),
        ),
        "header missing",
    );
    assert_eq!(v.parameter_name(), Some("Idempotency-Key"));

    let zero = serde_json::json!({"customer_id": 0, "items": [{"sku": "A", "qty": 1}]});
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &with_key,
            zero.to_string().as_bytes(),
        ),
        "3.0 boolean exclusiveMinimum",
    );
    assert_eq!(v.pointer(), Some("#/customer_id"));

    let nested = serde_json::json!({"customer_id": 1, "items": [{"sku": "A", "qty": 0}]});
    let v = violation(
        check(
            &validation,
            Method::POST,
            "/orders",
            &with_key,
            nested.to_string().as_bytes(),
        ),
        "component $ref item",
    );
    assert_eq!(v.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v.pointer(), Some("#/items/0/qty"));

    let v = violation(
        check(&validation, Method::POST, "/orders", &with_key, b""),
        "required body missing",
    );
    assert_eq!(v.slug(), "body-required");

    let xml = headers(&[
        ("content-type", "application/xml"),
        ("content-length", "3"),
        ("idempotency-key", "0123456789"),
    ]);
    let v = violation(
        check(&validation, Method::POST, "/orders", &xml, b"<a/>"),
        "undeclared media type",
    );
    assert_eq!(v.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[test]
fn broken_openapi_documents_are_refused_at_load() {
    let dir = crate::auth::testing::temp_dir("openapi-broken");
    let cases = [
        (
            "not-openapi.json",
            "{\"swagger\": \"2.0\"}",
            "no `openapi` version",
        ),
        (
            "undeclared-param.json",
            r#"{"openapi":"3.1.0","paths":{"/a/{id}":{"get":{}}}}"#,
            "does not declare its path parameter `id`",
        ),
        (
            "bad-ref.json",
            r##"{"openapi":"3.1.0","paths":{"/a":{"get":{"parameters":[{"$ref":"#/components/parameters/Nope"}]}}}}"##,
            "points at nothing",
        ),
        ("broken.yaml", "openapi: [unclosed", "not valid YAML"),
    ];
    for (name, text, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        let toml = format!(
            "[[routes]]\nname = \"r\"\nupstream = \"u\"\n[routes.validate]\nopenapi = {:?}\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n",
            path.display().to_string()
        );
        let Err(error) = Config::parse(&toml) else {
            panic!("{name} must be refused");
        };
        let message = error.to_string();
        assert!(
            message.contains("`routes[0].validate.openapi`") && message.contains(expected),
            "{name}: {message}"
        );
    }
}

#[test]
fn percent_decoding_keeps_broken_escapes() {
    assert_eq!(percent_decode("a%20b"), "a b");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz%+1"), "%zz%+1");
    assert_eq!(
        query_pairs(Some("q=a+b&x=%2F&flag")),
        [
            ("q".to_owned(), "a b".to_owned()),
            ("x".to_owned(), "/".to_owned()),
            ("flag".to_owned(), String::new())
        ]
    );
}
