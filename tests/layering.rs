//! The crate's layering, as its top-level docs state it, kept checked: a module may use only
//! modules of lower layers, so that no import cycle can come back.

use std::path::{Path, PathBuf};

/// Lowest first. A module may name modules of lower layers only (not of its own layer).
const LAYERS: &[&[&str]] = &[
    // Helpers that know nothing of wakegate.
    &["plot", "telemetry", "demo"],
    &["config"],
    &["target", "memory"],
    &["proxy", "provider"],
    &["scaling"],
    &["metrics"],
    &["admin", "keda"],
    &["control"],
    &["app"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Every `crate::<module>` that `text` names, with its line number.
fn uses(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
        }
    }
    found
}

/// The layering violations of one file of top-level module `module`.
fn violations(module: &str, file: &str, text: &str) -> Vec<String> {
    let Some(own) = layer(module) else {
        return vec![format!(
            "{file}: module `{module}` is in no layer; add it to LAYERS"
        )];
    };
    uses(text)
        .into_iter()
        .filter(|(_, used)| used != module)
        .filter_map(|(line, used)| match layer(&used) {
            Some(theirs) if theirs < own => None,
            Some(_) => Some(format!(
                "{file}:{line}: `{module}` uses `{used}`, which is not below it"
            )),
            None => Some(format!("{file}:{line}: `{used}` is in no layer")),
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut checked = 0;
    for path in &files {
        let relative = path.strip_prefix(&src).unwrap();
        let shown = relative.display().to_string();
        // The crate root and the binary wire everything; tests may reach anywhere.
        if shown == "lib.rs"
            || shown == "main.rs"
            || relative.file_name().is_some_and(|n| n == "tests.rs")
            || relative.components().any(|c| c.as_os_str() == "tests")
        {
            continue;
        }
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(path).unwrap();
        problems.extend(violations(&module, &shown, &text));
        checked += 1;
    }
    assert!(checked > 30, "only {checked} files checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_catches_a_lower_module_using_a_higher_one() {
    let text = "use crate::target::Target;\nfn f() { crate::proxy::route::host_of(\"a\"); }\n";
    assert_eq!(
        violations("target", "target/stats.rs", "use crate::target::Phase;\n"),
        Vec::<String>::new(),
        "its own module is fine"
    );
    assert_eq!(
        violations("config", "config/mod.rs", text),
        [
            "config/mod.rs:1: `config` uses `target`, which is not below it",
            "config/mod.rs:2: `config` uses `proxy`, which is not below it",
        ]
    );
    assert!(violations("provider", "p.rs", text)[0].contains("`proxy`"));
    assert!(violations("app", "app.rs", text).is_empty());
}

#[test]
fn the_crate_docs_state_the_same_layers() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for layer in LAYERS {
        for module in *layer {
            assert!(
                lib.contains(&format!("[`{module}`]")),
                "src/lib.rs does not name `{module}` in its layering docs"
            );
        }
    }
}
