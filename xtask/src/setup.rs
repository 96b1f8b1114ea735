//! Idempotent machine set-up for building and running stalltrace on Debian 12.
//!
//! The eBPF programs need a Rust compiler with a `core` for bpfel-unknown-none and bpf-linker
//! built against the same LLVM. Debian bookworm-security ships both (rustc-web 1.96 with
//! libstd-rust-web-dev-bpf, and llvm-22): see docs/toolchain.md for why this route.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The rustup name build.rs uses for the BPF toolchain (Debian's rustc-web under /usr).
pub(crate) const BPF_TOOLCHAIN: &str = "stalltrace-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// aya 0.14 needs Rust >= 1.87; bookworm main has rustc-web 1.85, bookworm-security 1.96.
const MIN_BPF_RUSTC_MINOR: u32 = 87;

const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

pub(crate) fn run() -> Result<()> {
    install_packages(PACKAGES)?;
    check_bpf_rustc()?;
    link_toolchain()?;
    install_bpf_linker()?;
    mount_tracefs()?;
    Ok(())
}

fn step(what: &str, outcome: &str) {
    println!("xtask setup: {what}: {outcome}");
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn require_root(for_what: &str) -> Result<()> {
    if !is_root() {
        bail!("{for_what} needs root; run it as root (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask ...`)");
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Installs the missing Debian packages (refreshing the package lists first, since a stale
/// list may only offer too-old versions).
pub(crate) fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step(
            "Debian packages",
            &format!("present ({})", packages.join(" ")),
        );
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    step(
        "Debian packages",
        &format!("installing {}", missing.join(" ")),
    );
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn check_bpf_rustc() -> Result<()> {
    let output = Command::new("/usr/bin/rustc")
        .arg("--version")
        .output()
        .context("running /usr/bin/rustc (from rustc-web)")?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if minor < MIN_BPF_RUSTC_MINOR {
        bail!(
            "/usr/bin/rustc is `{version}`, but aya needs Rust 1.{MIN_BPF_RUSTC_MINOR} or newer: \
             install rustc-web from bookworm-security (apt-get update && apt-get install \
             rustc-web libstd-rust-web-dev-bpf)"
        );
    }
    if !Path::new("/usr/lib/rustlib/bpfel-unknown-none").is_dir() {
        bail!("/usr/lib/rustlib/bpfel-unknown-none is missing: install libstd-rust-web-dev-bpf");
    }
    Ok(())
}

pub(crate) fn rustup() -> Command {
    let mut command = Command::new("rustup");
    command.env("PATH", path_with_cargo_bin());
    command
}

fn link_toolchain() -> Result<()> {
    let list = rustup()
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (the Rust toolchain manager)")?;
    let listed = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(BPF_TOOLCHAIN));
    if listed {
        step(
            "rustup toolchain",
            &format!("{BPF_TOOLCHAIN} -> /usr present"),
        );
        return Ok(());
    }
    step(
        "rustup toolchain",
        &format!("linking {BPF_TOOLCHAIN} -> /usr"),
    );
    run_checked(rustup().args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

/// PATH with cargo's bin directory (where bpf-linker goes) in front.
pub(crate) fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).expect("PATH entries are valid")
}

fn install_bpf_linker() -> Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    let current = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        step("bpf-linker", &format!("{BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    step(
        "bpf-linker",
        &format!("installing {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"),
    );
    // Its default feature wants LLVM 23, which Debian lacks; without LLVM_PREFIX its build
    // finds LLVM 14's llvm-config first.
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path_with_cargo_bin())
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
}

/// A nightly toolchain is installed (on this machine kind, rustup's own nightly).
pub(crate) fn has_nightly() -> bool {
    rustup()
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

pub(crate) fn install_cargo_fuzz() -> Result<()> {
    let present = Command::new(cargo_bin().join("cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        step("cargo-fuzz", "present");
        return Ok(());
    }
    step("cargo-fuzz", "installing from crates.io (about 30 s)");
    run_checked(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .env("PATH", path_with_cargo_bin()),
    )
}

fn mount_tracefs() -> Result<()> {
    let root = Path::new("/sys/kernel/tracing");
    if root.join("events").is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        step("tracefs", "mounted");
        return Ok(());
    }
    if !is_root() {
        step(
            "tracefs",
            "not mounted; the daemon mounts it when it starts (as root)",
        );
        return Ok(());
    }
    step("tracefs", "mounting at /sys/kernel/tracing");
    run_checked(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

pub(crate) fn run_checked(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
