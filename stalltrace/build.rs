//! Builds the kernel programs (stalltrace-ebpf) for the BPF target with aya-build and leaves the
//! object in OUT_DIR, where src/probes.rs embeds it.
//!
//! The BPF target needs a compiler with a prebuilt `core` for bpfel-unknown-none: on Debian that
//! is rustc-web with libstd-rust-web-dev-bpf, linked as the rustup toolchain `stalltrace-bpf` by
//! `cargo xtask setup`. Another toolchain can be named with STALLTRACE_BPF_TOOLCHAIN.
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=STALLTRACE_BPF_TOOLCHAIN");
    let toolchain =
        env::var("STALLTRACE_BPF_TOOLCHAIN").unwrap_or_else(|_| "stalltrace-bpf".to_owned());
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../stalltrace-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "stalltrace-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF programs with toolchain `{toolchain}` failed; run `cargo xtask \
             setup` to install the BPF toolchain and bpf-linker"
        )
    })
}
