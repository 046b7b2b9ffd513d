//! `cargo xtask dist`, the release tarball the README's install section
//! uses: its checksum verifies with `sha256sum -c`; it holds the static
//! binaries (which run), the completions, the man pages, the example
//! configs and the deploy folder as they are in the repository; the same
//! sources give the same bytes.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cargo xtask dist --out OUT`: the tarball it names last.
fn dist(out: &Path) -> PathBuf {
    let o = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["xtask", "dist", "--out"])
        .arg(out)
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "cargo xtask dist: {}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(stdout.lines().last().unwrap().trim())
}

fn run(cmd: &mut Command) -> String {
    tproxy_lab::run(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every file below `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn the_release_tarball_holds_what_the_readme_installs_and_verifies() {
    let a = tempfile::tempdir().unwrap();
    let tarball = dist(a.path());
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("tproxy-{version}-x86_64-linux");
    assert_eq!(tarball, a.path().join(format!("{name}.tar.gz")));
    let out = run(Command::new("sha256sum")
        .args(["-c", &format!("{name}.tar.gz.sha256")])
        .current_dir(a.path()));
    assert_eq!(out.trim(), format!("{name}.tar.gz: OK"));

    let x = tempfile::tempdir().unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(x.path()));
    let top = x.path().join(&name);
    let listed = files(&top);
    for f in [
        "README.md",
        "bin/tproxy",
        "bin/tproxy-cni",
        "completions/_tproxy",
        "completions/tproxy.bash",
        "completions/tproxy.fish",
        "man/tproxy.1",
        "man/tproxy-agent.1",
        "deploy/Containerfile",
        "deploy/install-cni.sh",
    ] {
        assert!(listed.contains(&f.to_string()), "{f} in {listed:?}");
    }
    // The configs and the deploy folder as they are in the repository.
    for dir in ["deploy", "examples"] {
        let shipped: Vec<String> = listed
            .iter()
            .filter_map(|f| f.strip_prefix(&format!("{dir}/")))
            .map(String::from)
            .collect();
        let mut want = files(&repo().join(dir));
        if dir == "examples" {
            want.retain(|f| f.ends_with(".yaml") || f.ends_with(".cfg"));
        }
        assert_eq!(shipped, want, "{dir}");
        for f in &want {
            assert_eq!(
                std::fs::read(top.join(dir).join(f)).unwrap(),
                std::fs::read(repo().join(dir).join(f)).unwrap(),
                "{dir}/{f}"
            );
        }
    }
    // The binaries run, with no dynamic loader to find (static: any libc).
    let v = run(Command::new(top.join("bin/tproxy")).arg("--version"));
    assert_eq!(v.trim(), format!("tproxy {version}"));
    let v = run(Command::new(top.join("bin/tproxy-cni"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION"));
    assert!(v.contains("supportedVersions"), "{v}");
    for bin in ["tproxy", "tproxy-cni"] {
        let bytes = std::fs::read(top.join("bin").join(bin)).unwrap();
        assert!(!bytes.windows(8).any(|w| w == b"ld-linux"), "{bin} static");
    }
    for page in listed.iter().filter(|f| f.starts_with("man/")) {
        let text = std::fs::read_to_string(top.join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }

    // The same sources, the same bytes.
    let b = tempfile::tempdir().unwrap();
    let again = dist(b.path());
    assert_eq!(
        std::fs::read(&tarball).unwrap(),
        std::fs::read(&again).unwrap(),
        "two runs made different tarballs"
    );
}
