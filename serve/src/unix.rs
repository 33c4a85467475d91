//! Unix-socket listeners: created with their final mode before anyone can
//! reach them, and served with the listener limits.
//!
//! Binding a socket and then `chmod`-ing its path leaves a window in which
//! the socket has the umask's mode, and `chmod` follows symlinks: whoever
//! can write the directory could swap the path for a link to a file of
//! their choosing in between. So the socket is bound inside a fresh private
//! directory (0700, next to the final path so the rename stays on one
//! filesystem), its mode is set there where nobody else can reach it, and
//! it is renamed into place. `rename` replaces the directory entry itself,
//! never what a symlink there points at.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::limits::{Gate, PeerKey};

/// Why a unix socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another process is already serving on {0}; stop it or choose another path")]
    InUse(PathBuf),
    #[error("cannot create the socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a unix socket at `path` with permissions `mode`. A missing parent
/// directory is created with `dir_mode`. A stale socket left by a crashed
/// process is replaced; a live one (something answers on it) is not.
pub fn bind(path: &Path, mode: u32, dir_mode: u32) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .map_err(io)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(BindError::InUse(path.to_owned()));
    }
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("the socket path has no file name")))?;
    let private = dir.join(format!(
        ".{}.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    // `create` (not `create_all`): fails if the name exists, so nobody can
    // have prepared it for us.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io)?;
    let result = (|| {
        let staged = private.join("sock");
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result.map_err(io)
}

/// The peer credentials of a unix connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
}

/// Serves `routes` on `listener` until `shutdown`, one task per connection.
/// Each connection is admitted by `gate` under the caller's uid, then
/// `identify` turns it into the value every request carries as an extension
/// (or `None` to close it): that is where a server attests the caller once,
/// at connect. The returned key replaces the uid for the per-peer cap.
pub async fn serve<C, F, Fut>(
    listener: UnixListener,
    gate: Arc<Gate>,
    routes: tonic::service::Routes,
    identify: F,
    mut shutdown: watch::Receiver<bool>,
) where
    C: Clone + Send + Sync + 'static,
    F: Fn(&UnixStream, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<(Option<PeerKey>, C)>> + Send,
{
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    gate.accept_failed(&e);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let opened = tokio::time::Instant::now();
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let peer = Peer {
            uid: cred.uid(),
            pid: cred.pid(),
        };
        let Ok(mut permit) = gate.admit(PeerKey::Uid(peer.uid)) else {
            continue;
        };
        let gate = gate.clone();
        let routes = routes.clone();
        let identify = identify.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let Some((key, info)) = identify(&stream, peer).await else {
                return;
            };
            if let Some(key) = key
                && permit.rekey(key).is_err()
            {
                return;
            }
            let max_header_list_size = gate.limits().max_header_list_size as usize;
            let io = crate::authority::Rewriting::new(stream, max_header_list_size);
            crate::grpc::serve_connection(&gate, opened, io, info, routes, shutdown).await;
            drop(permit);
        });
    }
}
