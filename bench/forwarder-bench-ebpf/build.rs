use which::which;

/// Rebuild when the bpf-linker binary changes: the crate links with it, but
/// cargo cannot express a dependency on a binary.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found: run `cargo xtask prereq` (it installs bpf-linker against LLVM 22)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
