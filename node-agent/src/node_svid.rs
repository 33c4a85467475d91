//! The node's own identity on disk: SVID, key (mode 0600) and the latest
//! bundle, so an agent restart reconnects without a new join token.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use keyway_identity::{Svid, TrustBundle, TrustDomain};

const SVID_FILE: &str = "node-svid.pem";
const KEY_FILE: &str = "node-key.pem";
const BUNDLE_FILE: &str = "bundle.pem";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the data directory, owner-only.
pub fn prepare_dir(dir: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// Writes via a temporary file and rename, so a crash never leaves half a key.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), DiskError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn save_svid(dir: &Path, svid: &Svid) -> Result<(), DiskError> {
    write_atomic(&dir.join(KEY_FILE), svid.key_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(SVID_FILE), svid.chain_pem().as_bytes(), 0o644)
}

pub fn save_bundle(dir: &Path, bundle: &TrustBundle) -> Result<(), DiskError> {
    write_atomic(&dir.join(BUNDLE_FILE), bundle.to_pem().as_bytes(), 0o644)
}

/// The stored node SVID if there is one that is still valid.
pub fn load_svid(dir: &Path) -> Result<Option<Svid>, DiskError> {
    let (svid_path, key_path) = (dir.join(SVID_FILE), dir.join(KEY_FILE));
    if !svid_path.exists() || !key_path.exists() {
        return Ok(None);
    }
    let invalid = |path: &Path, reason: String| DiskError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let chain =
        keyway_identity::pem::decode_certs(&std::fs::read_to_string(&svid_path).map_err(io(&svid_path))?)
            .map_err(|e| invalid(&svid_path, e))?;
    let (_, key) =
        keyway_identity::pem::decode_key(&std::fs::read_to_string(&key_path).map_err(io(&key_path))?)
            .map_err(|e| invalid(&key_path, e))?;
    let svid = Svid::new(chain, key).map_err(|e| invalid(&svid_path, e.to_string()))?;
    if svid.not_after() <= SystemTime::now() {
        return Ok(None);
    }
    Ok(Some(svid))
}

/// The stored bundle (newer than the one given at install time once the
/// agent has synced), if present.
pub fn load_bundle(dir: &Path, td: &TrustDomain) -> Result<Option<TrustBundle>, DiskError> {
    let path = dir.join(BUNDLE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let pem = std::fs::read_to_string(&path).map_err(io(&path))?;
    TrustBundle::from_pem(td.clone(), &pem)
        .map(Some)
        .map_err(|e| DiskError::Invalid {
            path,
            reason: e.to_string(),
        })
}
