//! A pin directory on bpffs for the tests and benchmarks that load the
//! datapath themselves, removed with everything in it when dropped (also on
//! a panic), and typed handles on the maps pinned there.

use std::path::{Path, PathBuf};

use aya::Pod;
use aya::maps::{Map, MapData};

/// `/sys/fs/bpf/<prefix><pid>`: the datapath's maps and links, and pinned
/// programs under `progs/`.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// This process's directory for `prefix`, after removing the ones runs
    /// killed before their guards ran left (their pid is gone).
    pub fn new(prefix: &str) -> PinDir {
        if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix(prefix)
                    && pid.chars().all(|c| c.is_ascii_digit())
                    && !Path::new("/proc").join(pid).exists()
                {
                    drop(PinDir { path: e.path() });
                }
            }
        }
        PinDir {
            path: PathBuf::from(format!("/sys/fs/bpf/{prefix}{}", std::process::id())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where programs are pinned (made here).
    pub fn progs(&self) -> PathBuf {
        let progs = self.path.join("progs");
        std::fs::create_dir_all(&progs).expect("program pin dir");
        progs
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let progs = self.path.join("progs");
        if let Ok(dir) = std::fs::read_dir(&progs) {
            for e in dir.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&progs);
        let _ = node_agent::datapath::uninstall(&self.path);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The hash map pinned as `name` in `pin_dir`.
pub fn open_hash<K: Pod, V: Pod>(pin_dir: &Path, name: &'static str) -> aya::maps::HashMap<MapData, K, V> {
    let data = MapData::from_pin(pin_dir.join(name)).unwrap_or_else(|e| panic!("opening {name}: {e}"));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e}"));
    aya::maps::HashMap::try_from(map).unwrap_or_else(|e| panic!("{name}: {e}"))
}
