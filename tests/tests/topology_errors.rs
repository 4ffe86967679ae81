//! Golden tests of topology error text: one fixture per kind of mistake under
//! `tests/fixtures/topologies/`, each beside the exact text `latentflow validate` prints.
//! Set `LATENTFLOW_BLESS=1` to rewrite the `.expected` files after an intended change.

use latentflow_engine::Plan;
use latentflow_tests::{fixture, testops::catalog};

fn check(name: &str, overrides: &[&str]) {
    let path = fixture(&format!("topologies/{name}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let errors = Plan::from_toml(&format!("{name}.toml"), &text, &overrides, &catalog())
        .expect_err("the fixture is invalid")
        .to_string()
        + "\n";
    let expected_path = path.with_extension("expected");
    if std::env::var_os("LATENTFLOW_BLESS").is_some() {
        std::fs::write(&expected_path, &errors).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(errors, expected, "{name}: errors differ from {}", expected_path.display());
}

#[test]
fn unknown_operator_types_suggest_the_closest() {
    check("unknown_type", &[]);
}

#[test]
fn unknown_keys_suggest_the_closest() {
    check("unknown_key", &[]);
}

#[test]
fn missing_inputs_and_sources_with_inputs() {
    check("missing_input", &[]);
}

#[test]
fn unknown_inputs_suggest_the_closest() {
    check("unknown_input", &[]);
}

#[test]
fn cycles_print_as_chains() {
    check("cycle", &[]);
}

#[test]
fn type_mismatches_name_the_columns() {
    check("type_mismatch", &[]);
}

#[test]
fn bad_values_give_the_allowed_range_all_at_once() {
    check("bad_values", &[]);
}

#[test]
fn toml_syntax_errors_name_the_line() {
    check("syntax", &[]);
}

#[test]
fn jobs_need_a_sink_and_outputs_must_go_somewhere() {
    check("no_sink", &[]);
}

#[test]
fn overrides_are_named_in_their_errors() {
    check("overrides", &["nodes.read.count=0", "nodes.sink.delay_ms=slow", "nodes.raed.count=1", "job.seed"]);
}
