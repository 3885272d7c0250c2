use anyhow::Context as _;
use aya_build::Toolchain;

/// Compiles the ceiling (forwarder-bench-ebpf, beside this crate) for the
/// BPF target and leaves it in OUT_DIR for `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../forwarder-bench-ebpf");
    let package = aya_build::Package {
        name: "forwarder-bench-ebpf",
        root_dir: root_dir
            .to_str()
            .context("the workspace path is not UTF-8")?,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
        .context("building the ceiling program: run `cargo xtask prereq` if nightly rust-src or bpf-linker is missing")?;
    // AYA_BUILD_SKIP (host-only lints) builds nothing: an empty object keeps
    // the crate compiling; `forwarder-bench ceiling` then fails to load it.
    let object = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("forwarder-ceiling");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    Ok(())
}
