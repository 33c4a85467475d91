//! Generates the tonic bindings at build time (see STYLE.md: generated code is
//! generated in build.rs). Needs `protoc`; `scripts/setup.sh` installs it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "spiffe/workloadapi.proto",
        "keyway/v1/keyway.proto",
        "keyway/v1/agent.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
