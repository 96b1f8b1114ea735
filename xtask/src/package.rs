//! `cargo xtask package`: the Debian package, built with cargo-deb from the release binary, the
//! systemd unit and logrotate snippet in deploy/debian/, and man pages and shell completions
//! generated from the clap definitions (so they say what `--help` says).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, setup, workspace_root};

const CARGO_DEB_VERSION: &str = "3.8.0";

/// The shells whose completions the package installs, and the file names the asset list in
/// stalltrace/Cargo.toml (`[package.metadata.deb]`) expects.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "stalltrace.bash"),
    ("zsh", "_stalltrace"),
    ("fish", "stalltrace.fish"),
];

/// Builds target/debian/stalltrace_VERSION_ARCH.deb and returns its path.
pub(crate) fn build() -> Result<PathBuf> {
    setup::run()?;
    install_cargo_deb()?;
    println!("xtask package: building stalltrace (release)");
    setup::run_checked(cargo().args(["build", "--release", "--package", "stalltrace"]))?;
    let release = workspace_root().join("target/release");
    let generated = release.join("package");
    if generated.exists() {
        fs::remove_dir_all(&generated)
            .with_context(|| format!("clearing {}", generated.display()))?;
    }
    generate_man_pages(&release, &generated.join("man"))?;
    generate_completions(&release, &generated.join("completions"))?;
    let out_dir = workspace_root().join("target/debian");
    fs::create_dir_all(&out_dir)?;
    println!("xtask package: packaging with cargo-deb");
    let output = cargo()
        .args(["deb", "--no-build", "--package", "stalltrace", "--output"])
        .arg(&out_dir)
        .env("PATH", setup::path_with_cargo_bin())
        .output()
        .context("running cargo deb")?;
    print!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("cargo deb failed ({})", output.status);
    }
    // cargo-deb prints the path of the package it wrote, last.
    let deb = String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .find(|line| line.trim_end().ends_with(".deb"))
        .map(|line| PathBuf::from(line.trim()))
        .context("cargo deb did not say where it wrote the package")?;
    println!("xtask package: wrote {}", deb.display());
    Ok(deb)
}

fn generate_man_pages(release: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    setup::run_checked(Command::new(release.join("stalltrace-gen-man")).arg(dir))?;
    // Debian ships man pages compressed; -n: no name or time stamp, so builds are reproducible.
    setup::run_checked(
        Command::new("sh")
            .arg("-c")
            .arg("gzip -9nf -- *.1")
            .current_dir(dir),
    )
}

fn generate_completions(release: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    for (shell, file) in COMPLETIONS {
        let output = Command::new(release.join("stalltrace"))
            .args(["completions", shell])
            .output()
            .with_context(|| format!("generating the {shell} completions"))?;
        if !output.status.success() || output.stdout.is_empty() {
            bail!(
                "`stalltrace completions {shell}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        fs::write(dir.join(file), &output.stdout)?;
    }
    println!("xtask package: man pages and completions generated");
    Ok(())
}

fn install_cargo_deb() -> Result<()> {
    let present = Command::new("cargo")
        .args(["deb", "--version"])
        .env("PATH", setup::path_with_cargo_bin())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_DEB_VERSION));
    if present {
        println!("xtask setup: cargo-deb: {CARGO_DEB_VERSION} present");
        return Ok(());
    }
    println!(
        "xtask setup: cargo-deb: installing {CARGO_DEB_VERSION} from crates.io (about a minute)"
    );
    setup::run_checked(
        Command::new("cargo")
            .args([
                "install",
                &format!("cargo-deb@{CARGO_DEB_VERSION}"),
                "--locked",
            ])
            .env("PATH", setup::path_with_cargo_bin()),
    )
}
