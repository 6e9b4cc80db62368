//! Per-request latency of the authorize and validate phases: one Cedar decision on the test
//! policy set, and a ~1 KB JSON body through depth scan, parse and JSON Schema validation.
//! `cargo bench -p gateway-userspace --bench authz_validate`.
use std::{
    collections::BTreeSet,
    hint::black_box,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_userspace::{
    auth::{AuthMethod, Identity},
    authz::{CedarPolicies, RequestFacts, RouteAuthz, TlsFacts},
    config::{
        Config,
        authz::{AuthzConfig, RouteAuthzConfig},
    },
    validate::{BodyContext, Validations},
};
use http::{HeaderMap, HeaderValue, Method, Uri, header};

fn testdata(module: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module)
        .join("testdata")
        .join(name)
}

fn cedar(c: &mut Criterion) {
    let policies = CedarPolicies::from_config(&AuthzConfig {
        cedar_schema: Some(testdata("authz", "gateway.cedarschema")),
        cedar_policies: vec![testdata("authz", "orders.cedar")],
    })
    .unwrap_or_else(|e| panic!("bench policies: {e}"))
    .expect("policies configured");
    let route = RouteAuthz::new(
        "orders",
        &RouteAuthzConfig {
            cedar: true,
            ..RouteAuthzConfig::default()
        },
        Some(Arc::new(policies)),
    );
    let identity = Identity {
        principal: "alice".to_owned(),
        method: AuthMethod::Mtls,
        scopes: BTreeSet::from(["orders:read".to_owned(), "orders:write".to_owned()]),
        roles: BTreeSet::new(),
        claims: serde_json::json!({"tenant": "acme", "sub": "alice", "exp": 1_800_000_000})
            .as_object()
            .cloned()
            .expect("claims object"),
    };
    let method = Method::GET;
    let params = [("id".to_owned(), "42".to_owned())];
    let facts = RequestFacts {
        route: "orders",
        method: &method,
        path: "/orders/42",
        path_params: &params,
        operation: Some("getOrder"),
        source: Ipv4Addr::new(192, 0, 2, 10).into(),
        time: SystemTime::now(),
        tls: Some(TlsFacts {
            version: "TLSv1.3",
            sni: Some("api.example.com"),
            client_certificate: false,
        }),
    };
    route
        .authorize(Some(&identity), &facts)
        .unwrap_or_else(|e| panic!("the bench request must be permitted: {e}"));
    c.bench_function("cedar_authorize_permit_4_policies", |b| {
        b.iter(|| route.authorize(black_box(Some(&identity)), black_box(&facts)))
    });
}

fn schema(c: &mut Criterion) {
    let toml = format!(
        "[[routes]]\nname = \"orders\"\nupstream = \"u\"\n[routes.validate]\njson_schema = {:?}\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n",
        testdata("validate", "order.schema.json")
            .display()
            .to_string()
    );
    let config = Config::parse(&toml).unwrap_or_else(|e| panic!("bench config: {e}"));
    let validations = Validations::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let route = validations.route("orders").expect("orders validates");
    let items: Vec<_> = (0..20)
        .map(
            |i| serde_json::json!({"sku": format!("SKU-{i:04}"), "qty": i + 1, "unit_price": 4.25}),
        )
        .collect();
    let body = serde_json::json!({
        "customer": {"id": 7, "email": "ann@example.com", "name": "Ann Example"},
        "items": items,
        "note": "leave at the door",
        "priority": "normal",
    })
    .to_string();
    assert!(
        (900..1300).contains(&body.len()),
        "the bench body should be about 1 KB, is {}",
        body.len()
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let uri: Uri = "/orders".parse().expect("uri");
    let operation = route
        .check_head(&Method::POST, &uri, &headers)
        .unwrap_or_else(|e| panic!("bench head: {e}"));
    let ctx = BodyContext::new(&headers, operation.as_ref());
    route
        .check_body(body.as_bytes(), &ctx)
        .unwrap_or_else(|e| panic!("the bench body must be valid: {e}"));
    c.bench_function("json_schema_validate_1kb_body", |b| {
        b.iter(|| route.check_body(black_box(body.as_bytes()), black_box(&ctx)))
    });
}

criterion_group!(benches, cedar, schema);
criterion_main!(benches);
