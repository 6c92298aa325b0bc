//! The node's identity on disk: a private key file, created with mode 0600
//! when missing, so that a restarted node keeps its key — and with it the
//! addresses and name the coordinator assigned.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tailnode_wg::PrivateKey;
use tracing::{info, warn};

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// It exists but cannot be read.
    #[error("{path}: cannot read the key file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// It does not hold a base64 private key.
    #[error("{path}: not a WireGuard private key: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: tailnode_wg::KeyError,
    },
    /// A new key could not be written.
    #[error("{path}: cannot create the key file: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The default key file: `$STATE_DIRECTORY/node.key`, else
/// `$XDG_STATE_HOME/tailnode/node.key`, else
/// `$HOME/.local/state/tailnode/node.key`, else `./tailnode-node.key`.
pub fn default_key_file() -> PathBuf {
    state_dir().map_or_else(
        || PathBuf::from("tailnode-node.key"),
        |d| d.join("node.key"),
    )
}

/// The directory where tailnode keeps state by default (see [`default_key_file`]).
pub fn state_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several, colon-separated: take the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        return Some(PathBuf::from(first));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("tailnode"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| PathBuf::from(home).join(".local/state/tailnode"))
}

/// Loads the private key from `path`, creating a new one (mode 0600, parent
/// directories 0700) when the file does not exist.
///
/// # Errors
/// [`KeyFileError`] when the file cannot be read, is not a key, or cannot be created.
pub fn load_or_create_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                warn!(path = %path.display(), "key file is readable by others; chmod 600 it");
            }
            text.trim().parse().map_err(|source| KeyFileError::Invalid {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(path),
        Err(source) => Err(KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let err = |source| KeyFileError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err)?;
    }
    let key = PrivateKey::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(format!("{}\n", key.to_base64()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(err)?;
    info!(path = %path.display(), public_key = %key.public_key().short(), "created a new node key");
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_mode_600_then_reloads_the_same_key() {
        let dir = std::env::temp_dir().join(format!("tailnode-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/node.key");
        let first = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_key(&path).unwrap();
        assert_eq!(first, again);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            load_or_create_key(&path),
            Err(KeyFileError::Invalid { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
