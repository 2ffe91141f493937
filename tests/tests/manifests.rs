//! Every Kubernetes manifest under `deploy/` validates strictly against the Kubernetes schemas
//! (`kubernetes-validate`, from PyPI; `.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use sidemesh_tests::{skip, workspace_root};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(path);
        }
    }
}

#[test]
fn deploy_manifests_validate_strictly() {
    if Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("kubernetes-validate (pip install kubernetes-validate) is not installed");
        return;
    }
    let mut files = Vec::new();
    yaml_files(&workspace_root().join("deploy"), &mut files);
    assert!(!files.is_empty(), "no manifests under deploy/");
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for file in &files {
        assert!(
            text.contains(&format!("{} passed", file.display())),
            "{} was not validated:\n{text}",
            file.display()
        );
    }
}
