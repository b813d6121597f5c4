//! The OpenAPI document (DESIGN §5): the committed `worker/openapi.json` is exactly what the
//! code generates, a running gateway serves that same document at `/v1/openapi.json`, and
//! the document is valid OpenAPI 3.1 by an independent validator.
//!
//! The validator is `openapi-spec-validator` (Python, pinned in `.ci/openapi-requirements.txt`)
//! run through `.ci/openapi-validate.py`. `.ci/test` installs it into `target/ci-venv` and
//! sets `GEOPUSH_CI_PYTHON`; without either, the validation tests fail and say how to set it
//! up rather than skip, so a missing validator cannot pass for a valid document.
//!
//! After changing the API: `GEOPUSH_UPDATE_OPENAPI=1 cargo test -p geopush-tests --test
//! openapi` rewrites `worker/openapi.json`; commit it with the change.

use geopush_gateway::api::openapi::{document, document_json};
use geopush_tests::{READ_TIMEOUT, TestGateway, test_config};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one validator run may take (a cold Python start on a loaded machine included).
const VALIDATOR_TIMEOUT: Duration = Duration::from_secs(120);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn committed_path() -> PathBuf {
    workspace_root().join("worker").join("openapi.json")
}

const REGENERATE: &str = "GEOPUSH_UPDATE_OPENAPI=1 cargo test -p geopush-tests --test openapi";

#[test]
fn committed_document_is_the_generated_one() {
    let path = committed_path();
    let generated = document_json();
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed == generated {
        return;
    }
    if std::env::var("GEOPUSH_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &generated)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("updated {}", path.display());
        return;
    }
    let first_difference = committed
        .lines()
        .zip(generated.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| format!("line {}: committed {a:?}, generated {b:?}", i + 1))
        .unwrap_or_else(|| {
            format!(
                "one is a prefix of the other ({} vs {} lines)",
                committed.lines().count(),
                generated.lines().count()
            )
        });
    panic!(
        "{} is not the document the code generates ({first_difference}).\n\
         Regenerate it with `{REGENERATE}` and commit it.",
        path.display()
    );
}

#[test]
fn generated_json_is_the_document() {
    // The committed text is a faithful rendering of `document()`, with a final newline.
    let text = document_json();
    assert!(text.ends_with("}\n"), "pretty JSON with a final newline");
    let parsed: Value = serde_json::from_str(&text).expect("document_json is JSON");
    let direct = serde_json::to_value(document()).expect("document serializes");
    assert_eq!(parsed, direct);
    assert_eq!(parsed["openapi"], json!("3.1.0"));
}

#[tokio::test]
async fn served_document_is_the_generated_one() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let response = tokio::time::timeout(
        READ_TIMEOUT,
        geopush_tests::http::get(gateway.addr(), "/v1/openapi.json"),
    )
    .await
    .expect("GET /v1/openapi.json in time")
    .expect("GET /v1/openapi.json");
    assert_eq!(response.status, 200, "{}", response.text());
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content type {content_type:?}"
    );
    let served = response.json().expect("served document is JSON");
    let generated: Value = serde_json::from_str(&document_json()).expect("generated is JSON");
    assert_eq!(served, generated, "served and generated documents differ");
    gateway.shutdown().await.expect("shutdown");
}

/// The Python that has the validator: `GEOPUSH_CI_PYTHON`, else `target/ci-venv/bin/python`.
/// Neither: fail with how to set it up.
fn validator_python() -> PathBuf {
    if let Some(python) = std::env::var_os("GEOPUSH_CI_PYTHON") {
        let python = PathBuf::from(python);
        assert!(
            python.exists(),
            "GEOPUSH_CI_PYTHON={} does not exist; run .ci/test, or unset it and set up \
             target/ci-venv (see .ci/test)",
            python.display()
        );
        return python;
    }
    let venv = workspace_root()
        .join("target")
        .join("ci-venv")
        .join("bin")
        .join("python");
    assert!(
        venv.exists(),
        "no OpenAPI validator: GEOPUSH_CI_PYTHON is not set and {} does not exist.\n\
         Run .ci/test (it installs one), or by hand:\n  python3 -m venv target/ci-venv && \
         target/ci-venv/bin/pip install -r .ci/openapi-requirements.txt",
        venv.display()
    );
    venv
}

/// What the validator said about one document.
struct Verdict {
    valid: bool,
    output: String,
}

/// Write `document` to a scratch file named `name` and run the validator on it.
async fn validate(name: &str, document: &str) -> Verdict {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openapi");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join(name);
    std::fs::write(&file, document).expect("scratch file");
    let script = workspace_root().join(".ci").join("openapi-validate.py");
    let python = validator_python();
    let child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&file)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(VALIDATOR_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("the validator did not finish within {VALIDATOR_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match output.status.code() {
        Some(0) => Verdict {
            valid: true,
            output: text,
        },
        Some(1) => Verdict {
            valid: false,
            output: text,
        },
        // 2: not installed or bad usage; anything else: it crashed.
        _ => panic!(
            "the validator could not run ({}):\n{text}\nSet it up with .ci/test, or: \
             python3 -m venv target/ci-venv && target/ci-venv/bin/pip install -r \
             .ci/openapi-requirements.txt",
            output.status
        ),
    }
}

#[tokio::test]
async fn document_is_valid_openapi_3_1() {
    let verdict = validate("generated.json", &document_json()).await;
    assert!(
        verdict.valid,
        "the generated OpenAPI document is not valid OpenAPI 3.1:\n{}",
        verdict.output
    );
}

/// The validator can fail: each deliberately broken copy of the document is refused.
#[tokio::test]
async fn validator_refuses_broken_documents() {
    let good: Value = serde_json::from_str(&document_json()).expect("JSON");
    // Each break, and what the validator must say about it.
    let mut breaks: Vec<(&str, Value, &str)> = Vec::new();

    let mut no_info = good.clone();
    no_info.as_object_mut().expect("object").remove("info");
    breaks.push(("no-info", no_info, "'info' is a required property"));

    let mut dangling_ref = good.clone();
    dangling_ref["paths"]["/v1/notifications"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"] = json!({"$ref": "#/components/schemas/NoSuchSchema"});
    breaks.push(("dangling-ref", dangling_ref, "does not resolve"));

    let mut bad_type = good.clone();
    bad_type["components"]["schemas"]["Circle"]["properties"]["lat"]["type"] = json!("float");
    breaks.push(("bad-type", bad_type, "'float'"));

    let mut undeclared_parameter = good.clone();
    undeclared_parameter["paths"]["/v1/notifications/{id}"]["get"]
        .as_object_mut()
        .expect("operation")
        .remove("parameters");
    breaks.push((
        "undeclared-path-parameter",
        undeclared_parameter,
        "Path parameter 'id'",
    ));

    let mut bad_status = good.clone();
    bad_status["paths"]["/v1/places/{id}"]["delete"]["responses"] = json!({"204": "Deleted"});
    breaks.push((
        "bad-response",
        bad_status,
        "'Deleted' is not of type 'object'",
    ));

    let mut version_30 = good.clone();
    version_30["openapi"] = json!("3.0.3");
    breaks.push(("not-3.1", version_30, "not 3.1.x"));

    for (name, broken, says) in breaks {
        let text = serde_json::to_string_pretty(&broken).expect("JSON");
        let verdict = validate(&format!("broken-{name}.json"), &text).await;
        assert!(
            !verdict.valid,
            "the validator accepted a broken document ({name}):\n{}",
            verdict.output
        );
        assert!(
            verdict.output.contains(says),
            "the validator refused {name} but not for the break (expected {says:?}):\n{}",
            verdict.output
        );
    }
    let verdict = validate("broken-not-json.json", "{\"openapi\": \"3.1.0\",").await;
    assert!(
        !verdict.valid && verdict.output.contains("cannot read it as JSON"),
        "truncated JSON accepted:\n{}",
        verdict.output
    );
}
