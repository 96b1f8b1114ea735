//! Rebuild the programs when bpf-linker changes: cargo cannot see the linker as an input.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
