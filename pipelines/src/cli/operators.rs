//! `latentflow operators`.

use latentflow_engine::{Catalog, OperatorKind, Schema};

use super::EXIT_OK;

/// Prints every operator type with its input and output columns and its keys.
pub fn list(catalog: &Catalog) -> i32 {
    print!("{}", describe(catalog));
    EXIT_OK
}

/// The listing `latentflow operators` prints.
pub fn describe(catalog: &Catalog) -> String {
    let mut out = String::new();
    for entry in catalog.entries() {
        out.push_str(&format!("{} ({}): {}\n", entry.type_name, entry.kind, entry.summary));
        if let Ok(spec) = entry.example_spec() {
            let ports = spec.ports();
            if entry.kind != OperatorKind::Source {
                out.push_str(&format!(
                    "  accepts: {}\n",
                    if ports.requires.is_empty() { "any columns".into() } else { ports.accepts().to_string() }
                ));
            }
            if !ports.adds.is_empty() {
                out.push_str(&format!("  adds:    {}\n", Schema::new(ports.adds.clone())));
            }
            if !ports.removes.is_empty() {
                out.push_str(&format!("  removes: {}\n", ports.removes.join(", ")));
            }
        }
        if entry.key_docs.is_empty() {
            out.push_str("  keys:    none\n");
        } else {
            out.push_str("  keys:\n");
            let width = entry.key_docs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (key, doc) in entry.key_docs {
                out.push_str(&format!("    {key:<width$}  {doc}\n"));
            }
        }
        out.push('\n');
    }
    out.push_str("Every node also takes `type`, `inputs` (node ids), `placement` (\"all\" or \"gpu\") and `reject_log` (a JSON-lines file of rejected rows).\n");
    out
}
