//! Loads every TC program of a BPF object (maps pinned under a scratch
//! directory) and prints how many instructions the verifier processed for
//! each, out of its 1M budget. `cargo run -p keyway-tests --example verify -- OBJ`.
//! For a program the verifier refuses, the last lines of its log, the
//! failing instruction first (`KEYWAY_VERIFIER_LOG_LINES`, default 8).
use aya::programs::SchedClassifier;

fn main() {
    let path = std::env::args().nth(1).expect("usage: verify OBJECT");
    let bytes = std::fs::read(&path).expect("read the object");
    let log_lines = std::env::var("KEYWAY_VERIFIER_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/keyway-verify-{}", std::process::id()));
    std::fs::create_dir_all(&pins).expect("pin dir");
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pins)
        .load(&bytes)
        .expect("load the object");
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in names {
        let prog: &mut SchedClassifier = ebpf.program_mut(&name).unwrap().try_into().unwrap();
        match prog.load() {
            Ok(()) => println!(
                "{name}: {}",
                prog.info()
                    .ok()
                    .and_then(|i| i.verified_instruction_count())
                    .unwrap_or(0)
            ),
            Err(e) => println!(
                "{name}: FAILED {}",
                e.to_string()
                    .lines()
                    .rev()
                    .take(log_lines)
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }
    drop(ebpf);
    let _ = std::fs::remove_dir_all(&pins);
}
