//! JSON bodies: the nesting depth measured on the raw bytes before anything parses them, and
//! JSON Schema (draft 2020-12) failures turned into [`Violation`]s that name the failing field
//! by JSON pointer and the broken rule, never the value.
use jsonschema::{Validator, error::ValidationErrorKind};

use super::Violation;

/// The deepest nesting of arrays and objects in `bytes`, or `Err(limit)` as soon as it passes
/// `limit`. A loop with a counter, not a recursive parser: a 1,000-deep (or 10-million-deep)
/// body costs one pass and no stack. Brackets inside strings do not count. Whether the bytes
/// are well-formed is the parser's question, asked afterwards.
pub(crate) fn depth_within(bytes: &[u8], limit: u32) -> Result<u32, u32> {
    let mut depth = 0u32;
    let mut deepest = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(limit);
                }
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(deepest)
}

/// Pointers name fields the schema declares, but `additionalProperties` and friends can put a
/// client's key in one: keep them short enough that they cannot carry a payload.
const MAX_POINTER_CHARS: usize = 256;

/// The first failure of `validator` on `instance`, as a 422 [`Violation`].
pub(crate) fn check_schema(
    validator: &Validator,
    instance: &serde_json::Value,
    what: &'static str,
) -> Result<(), Violation> {
    match first_error(validator, instance) {
        None => Ok(()),
        Some((pointer, rule)) => Err(Violation::schema(what, format!("#{pointer}"), rule)),
    }
}

/// The first failure of `validator` on `instance`: the JSON pointer of the failing value
/// (capped in length) and the rule it broke, in words that never quote the value.
pub(crate) fn first_error(
    validator: &Validator,
    instance: &serde_json::Value,
) -> Option<(String, String)> {
    let error = validator.iter_errors(instance).next()?;
    let mut pointer = error.instance_path().as_str().to_owned();
    if pointer.len() > MAX_POINTER_CHARS {
        let mut cut = MAX_POINTER_CHARS;
        while !pointer.is_char_boundary(cut) {
            cut -= 1;
        }
        pointer.truncate(cut);
    }
    Some((pointer, describe(error.kind())))
}

/// What rule a value broke, in words that quote the schema (limits, types, declared property
/// names) and never the instance.
pub(crate) fn describe(kind: &ValidationErrorKind) -> String {
    use ValidationErrorKind as K;
    match kind {
        K::Type { kind } => match kind {
            jsonschema::error::TypeKind::Single(t) => format!("must be of type {t}"),
            jsonschema::error::TypeKind::Multiple(types) => {
                let names: Vec<String> = types.iter().map(|t| t.to_string()).collect();
                format!("must be of type {}", names.join(" or "))
            }
        },
        K::Required { property } => match property.as_str() {
            Some(name) => format!("is missing the required property `{name}`"),
            None => "is missing a required property".to_owned(),
        },
        K::AdditionalProperties { .. } | K::UnevaluatedProperties { .. } => {
            "has a property that the schema does not allow".to_owned()
        }
        K::AdditionalItems { .. } | K::UnevaluatedItems { .. } => {
            "has more items than the schema allows".to_owned()
        }
        K::Enum { .. } => "is not one of the allowed values".to_owned(),
        K::Constant { .. } => "is not the required value".to_owned(),
        K::Format { format } => format!("is not a valid `{format}`"),
        K::Pattern { .. } => "does not match the required pattern".to_owned(),
        K::MinLength { limit } => format!("is shorter than {limit} characters"),
        K::MaxLength { limit } => format!("is longer than {limit} characters"),
        K::MinItems { limit } => format!("has fewer than {limit} items"),
        K::MaxItems { limit } => format!("has more than {limit} items"),
        K::MinProperties { limit } => format!("has fewer than {limit} properties"),
        K::MaxProperties { limit } => format!("has more than {limit} properties"),
        K::Minimum { limit } => format!("is less than the minimum {limit}"),
        K::Maximum { limit } => format!("is greater than the maximum {limit}"),
        K::ExclusiveMinimum { limit } => format!("must be greater than {limit}"),
        K::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        K::MultipleOf { .. } => "is not a multiple of the required number".to_owned(),
        K::UniqueItems => "has duplicate items".to_owned(),
        K::Contains => "has no item that the schema requires".to_owned(),
        K::AnyOf { .. } => "matches none of the allowed schemas (`anyOf`)".to_owned(),
        K::OneOfNotValid { .. } => "matches none of the allowed schemas (`oneOf`)".to_owned(),
        K::OneOfMultipleValid { .. } => {
            "matches more than one of the exclusive schemas (`oneOf`)".to_owned()
        }
        K::Not { .. } => "matches a schema it must not match (`not`)".to_owned(),
        K::FalseSchema => "is not allowed here".to_owned(),
        K::PropertyNames { .. } => "has a property name that the schema does not allow".to_owned(),
        _ => "does not satisfy the schema".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_measured_without_recursion() {
        assert_eq!(depth_within(br#"{"a":[1,{"b":[]}]}"#, 10), Ok(4));
        assert_eq!(
            depth_within(br#"{"a":"[[[[[[["}"#, 2),
            Ok(1),
            "brackets in strings"
        );
        assert_eq!(depth_within(br#"["\"[[["]"#, 1), Ok(1), "escaped quotes");
        let deep = "[".repeat(1_000) + &"]".repeat(1_000);
        assert_eq!(depth_within(deep.as_bytes(), 32), Err(32));
        // Ten million levels: a recursive parser would overflow the stack long before.
        let deeper = vec![b'['; 10_000_000];
        assert_eq!(depth_within(&deeper, 128), Err(128));
    }

    #[test]
    fn schema_failures_name_the_pointer_not_the_value() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"type": "object",
                "properties": {"qty": {"type": "integer"}}}}},
        });
        let validator = jsonschema::draft202012::new(&schema).expect("test schema compiles");
        let body = serde_json::json!({"items": [{"qty": 1}, {"qty": "secret-value"}]});
        let violation =
            check_schema(&validator, &body, "body").expect_err("qty must be an integer");
        assert_eq!(violation.pointer(), Some("#/items/1/qty"));
        assert_eq!(violation.status(), http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(violation.detail().contains("integer"), "{violation}");
        assert!(!violation.detail().contains("secret"), "{violation}");
    }
}
