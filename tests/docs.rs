//! The documentation as a reader follows it: every relative link of every Markdown file leads
//! to a file of the repository, every repository path a README, manifest, example or document
//! names exists, and README leads to every document under `docs/`.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The repository's files with one of `extensions`, outside build output and fuzz corpora.
fn files(extensions: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, extensions: &[&str], found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "corpus" {
                    walk(&path, extensions, found);
                }
            } else if extensions.iter().any(|e| name.ends_with(e)) {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo(), extensions, &mut found);
    found
}

#[test]
fn every_relative_markdown_link_leads_to_a_file() {
    let mut checked = 0;
    for file in files(&[".md"]) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let link = &rest[..end];
            if link.contains("://") || link.starts_with('#') || link.starts_with("mailto:") {
                continue;
            }
            let path = link.split('#').next().unwrap_or_default();
            if path.is_empty() {
                continue;
            }
            let target = file.parent().unwrap().join(path);
            assert!(
                target.exists(),
                "{}: the link ({link}) leads nowhere",
                file.strip_prefix(repo()).unwrap().display()
            );
            checked += 1;
        }
    }
    assert!(checked > 5, "only {checked} links found");
}

/// A word that names a file or directory of the repository: a path from its root (or one
/// relative to the file, `../…`), or an upper-case Markdown document (`DESIGN.md`).
fn repo_path(word: &str) -> Option<&str> {
    const ROOTS: [&str; 10] = [
        "deploy/",
        "examples/",
        "src/",
        "tests/",
        "loadtest/",
        "test-support/",
        "docs/",
        "proto/",
        "benches/",
        "../",
    ];
    let word = word.trim_end_matches(['.', ',', ':', ';']);
    if word.contains(['<', '*', '{', '$']) {
        return None;
    }
    let document = word
        .strip_suffix(".md")
        .is_some_and(|stem| !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_uppercase()));
    (document || ROOTS.iter().any(|r| word.starts_with(r))).then_some(word)
}

#[test]
fn every_repository_path_named_in_readmes_manifests_and_examples_exists() {
    // Written by the tools, not committed.
    const GENERATED: [&str; 1] = ["loadtest/results"];
    let mut checked = 0;
    let mut missing = Vec::new();
    for file in files(&[".md", ".yaml", ".toml"]) {
        let text = std::fs::read_to_string(&file).unwrap();
        // Braces and the like stay in the word, so that `a.{crt,key}` is seen as a pattern.
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || "_-./{}<>*$".contains(c))) {
            let Some(path) = repo_path(word) else {
                continue;
            };
            if GENERATED.iter().any(|g| path.starts_with(g)) {
                continue;
            }
            // `benches/layers`: the bench target, benches/layers.rs.
            let exists = |p: PathBuf| p.exists() || p.with_extension("rs").exists();
            if !(exists(file.parent().unwrap().join(path)) || exists(repo().join(path))) {
                missing.push(format!(
                    "{} names {path}",
                    file.strip_prefix(repo()).unwrap().display()
                ));
            }
            checked += 1;
        }
    }
    assert!(
        missing.is_empty(),
        "not in the repository:\n{}",
        missing.join("\n")
    );
    assert!(checked > 20, "only {checked} paths found");
}

#[test]
fn readme_links_every_document_under_docs() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let documents: Vec<PathBuf> = files(&[".md"])
        .into_iter()
        .filter(|f| f.starts_with(repo().join("docs")))
        .collect();
    assert!(!documents.is_empty(), "no document under docs/");
    let unlinked: Vec<String> = documents
        .iter()
        .map(|f| f.strip_prefix(repo()).unwrap().display().to_string())
        .filter(|path| !readme.contains(&format!("]({path})")))
        .collect();
    assert!(
        unlinked.is_empty(),
        "README.md links none of these, so readers will not find them: {unlinked:?}"
    );
}
