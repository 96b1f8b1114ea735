//! Rebuild the programs when bpf-linker changes: cargo cannot see the linker as an input.
//! Declare `bpf_target_arch` (set by aya-build to the daemon's architecture), which selects the
//! `pt_regs` layout: request capture reads x86-64 registers only.
fn main() {
    println!(
        "cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\", \"arm\", \
         \"riscv64\", \"powerpc64\", \"s390x\", \"mips\", \"loongarch64\"))"
    );
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
