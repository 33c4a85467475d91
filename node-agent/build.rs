//! Builds the kernel programs (auth-bpf/ebpf) for the BPF target with the
//! nightly toolchain and bpf-linker that `make setup` installs, and hands the
//! object to the agent, which embeds it (`include_bytes!`).
//!
//! The eBPF crate is a workspace of its own and builds into `target/bpf`, so
//! every profile of the host workspace (dev, release, clippy, test) shares
//! one build of it and cargo only redoes it when its sources change.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("node-agent has a parent directory")?;
    let ebpf = root.join("auth-bpf/ebpf");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain.toml",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    for p in ["src", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("auth-bpf/common").join(p).display()
        );
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root.join(d) }
        }
        None => root.join("target"),
    };
    let bpf_target_dir = target_dir.join("bpf");
    let object = build(&ebpf, &bpf_target_dir)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("keyway-tc.bpf.o");
    std::fs::copy(&object, &out).with_context(|| format!("copying {}", object.display()))?;
    println!("cargo:rustc-env=KEYWAY_BPF_OBJECT={}", out.display());
    Ok(())
}

fn build(ebpf: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(ebpf)
        .args([
            "+nightly",
            "build",
            "--release",
            "--locked",
            "-Z",
            "build-std=core",
        ])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(target_dir);
    // The outer cargo's settings are for the host; none of them may leak
    // into the BPF build (a wrapper, host RUSTFLAGS, the stable toolchain).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_")
            && key != "CARGO_HOME"
            && key != "CARGO_TERM_COLOR"
            && key != "CARGO_NET_OFFLINE"
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTFLAGS")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTDOC"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd
        .status()
        .context("running `cargo +nightly` for the kernel programs (is rustup installed?)")?;
    if !status.success() {
        bail!(
            "building the kernel programs in {} failed ({status}). They need the nightly toolchain with \
             rust-src and bpf-linker: run `make setup` (scripts/setup.sh) and try again",
            ebpf.display()
        );
    }
    Ok(target_dir.join("bpfel-unknown-none/release/keyway-tc"))
}
