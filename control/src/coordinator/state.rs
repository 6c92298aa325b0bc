//! The coordinator's state file: the identity (name, addresses) of every
//! node key it has admitted, so a restarted coordinator hands out the same
//! names and addresses.
//!
//! Format: JSON, `{"version": 1, "nodes": [{node_key, name, requested_name,
//! ipv4, ipv6}, ...]}`. Written atomically: a temporary file in the same
//! directory is written and fsynced, renamed over the old file, and the
//! directory is fsynced, so a crash leaves either the old or the new file.
//! A file that exists but cannot be read or validated is an error at
//! start-up, never silently replaced: it holds the tailnet's address plan.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CoordinatorError;
use crate::proto::{NodeKey, sanitize_name};

/// Version of the state file format this code reads and writes.
pub const STATE_VERSION: u32 = 1;

/// The persisted identities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Every node ever admitted (until an operator removes it).
    pub nodes: Vec<NodeRecord>,
}

/// The stable identity of one node key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// The node's WireGuard public key.
    pub node_key: NodeKey,
    /// Its unique, DNS-safe name.
    pub name: String,
    /// The sanitized name it asked for (`name` may carry a `-N` suffix). A
    /// node that asks for the same name again keeps `name`.
    pub requested_name: String,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address.
    pub ipv6: Ipv6Addr,
}

impl StateFile {
    /// A state with no nodes.
    pub fn empty() -> Self {
        StateFile {
            version: STATE_VERSION,
            nodes: Vec::new(),
        }
    }

    /// Reads `path`; `Ok(None)` if it does not exist.
    ///
    /// # Errors
    /// [`CoordinatorError::StateRead`] if it cannot be read,
    /// [`CoordinatorError::StateCorrupt`] if it is not a valid state file.
    pub fn load(path: &Path) -> Result<Option<Self>, CoordinatorError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CoordinatorError::StateRead {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|reason| CoordinatorError::StateCorrupt {
                path: path.to_owned(),
                reason,
            })
    }

    /// Parses and validates a state file's contents.
    ///
    /// # Errors
    /// A description of the first problem: bad JSON, unknown version,
    /// duplicate keys, names or addresses, names that are not DNS labels.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let state: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "state file version {} is not supported (this coordinator reads version {STATE_VERSION})",
                state.version
            ));
        }
        let mut keys = HashSet::new();
        let mut names = HashSet::new();
        let mut v4 = HashSet::new();
        let mut v6 = HashSet::new();
        for node in &state.nodes {
            if !keys.insert(node.node_key) {
                return Err(format!("node key {} appears twice", node.node_key));
            }
            if sanitize_name(&node.name) != node.name {
                return Err(format!("name {:?} is not a DNS label", node.name));
            }
            if !names.insert(node.name.as_str()) {
                return Err(format!("name {:?} appears twice", node.name));
            }
            if !v4.insert(node.ipv4) {
                return Err(format!("address {} appears twice", node.ipv4));
            }
            if !v6.insert(node.ipv6) {
                return Err(format!("address {} appears twice", node.ipv6));
            }
        }
        Ok(state)
    }

    /// The file's contents.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Writes the state to `path` atomically (see the module docs). Blocking:
    /// call it from `spawn_blocking` in async code.
    ///
    /// # Errors
    /// The I/O error of the step that failed; the old file is intact then.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir)?;
        let file_name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "state path has no file name")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&self.encode())?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, path)?;
            // Make the rename itself durable.
            fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Where the coordinator keeps its state by default:
/// `$STATE_DIRECTORY/coordinator.json` (systemd's `StateDirectory=`; the
/// first entry if it lists several), else
/// `$XDG_STATE_HOME/tailnode/coordinator.json`, else
/// `$HOME/.local/state/tailnode/coordinator.json`; `None` if none is set.
pub fn default_state_path() -> Option<PathBuf> {
    default_state_path_from(|name| std::env::var_os(name))
}

/// [`default_state_path`] over an arbitrary environment lookup.
pub fn default_state_path_from(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let non_empty = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dirs) = non_empty("STATE_DIRECTORY") {
        let dirs = dirs.to_string_lossy().into_owned();
        if let Some(first) = dirs.split(':').find(|d| !d.is_empty()) {
            return Some(Path::new(first).join("coordinator.json"));
        }
    }
    if let Some(xdg) = non_empty("XDG_STATE_HOME") {
        return Some(PathBuf::from(xdg).join("tailnode").join("coordinator.json"));
    }
    non_empty("HOME").map(|home| {
        PathBuf::from(home)
            .join(".local/state/tailnode")
            .join("coordinator.json")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn record(b: u8, name: &str) -> NodeRecord {
        NodeRecord {
            node_key: NodeKey([b; 32]),
            name: name.into(),
            requested_name: name.into(),
            ipv4: Ipv4Addr::new(100, 64, 0, b),
            ipv6: format!("fd7a:115c:a1e0::{b}").parse().unwrap(),
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tailnode-state-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn store_and_load_round_trip() {
        let dir = temp_dir("rt");
        let path = dir.join("sub/coordinator.json");
        assert_eq!(StateFile::load(&path).unwrap(), None);
        let state = StateFile {
            version: STATE_VERSION,
            nodes: vec![record(1, "a"), record(2, "b")],
        };
        state.store(&path).unwrap();
        assert_eq!(StateFile::load(&path).unwrap(), Some(state.clone()));
        // Overwrite, and no temporary file is left behind.
        let state2 = StateFile {
            version: STATE_VERSION,
            nodes: vec![record(3, "c")],
        };
        state2.store(&path).unwrap();
        assert_eq!(StateFile::load(&path).unwrap(), Some(state2));
        let entries: Vec<_> = fs::read_dir(dir.join("sub")).unwrap().collect();
        assert_eq!(entries.len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let dir = temp_dir("corrupt");
        let path = dir.join("coordinator.json");
        fs::write(&path, b"{ not json").unwrap();
        let err = StateFile::load(&path).unwrap_err();
        assert!(matches!(err, CoordinatorError::StateCorrupt { .. }));
        assert!(err.to_string().contains("coordinator.json"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn validation() {
        let ok = StateFile {
            version: 1,
            nodes: vec![record(1, "a"), record(2, "b")],
        };
        assert!(StateFile::decode(&ok.encode()).is_ok());
        let mut bad = ok.clone();
        bad.version = 2;
        assert!(
            StateFile::decode(&bad.encode())
                .unwrap_err()
                .contains("version 2")
        );
        let mut bad = ok.clone();
        bad.nodes[1].name = "a".into();
        assert!(
            StateFile::decode(&bad.encode())
                .unwrap_err()
                .contains("twice")
        );
        let mut bad = ok.clone();
        bad.nodes[1].ipv4 = bad.nodes[0].ipv4;
        assert!(StateFile::decode(&bad.encode()).is_err());
        let mut bad = ok.clone();
        bad.nodes[1].node_key = bad.nodes[0].node_key;
        assert!(StateFile::decode(&bad.encode()).is_err());
        let mut bad = ok;
        bad.nodes[1].name = "Not A Label".into();
        assert!(StateFile::decode(&bad.encode()).is_err());
    }

    #[test]
    fn default_path_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            default_state_path_from(env(&[
                ("STATE_DIRECTORY", "/var/lib/tn:/other"),
                ("XDG_STATE_HOME", "/x"),
                ("HOME", "/h")
            ])),
            Some(PathBuf::from("/var/lib/tn/coordinator.json"))
        );
        assert_eq!(
            default_state_path_from(env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/tailnode/coordinator.json"))
        );
        assert_eq!(
            default_state_path_from(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.local/state/tailnode/coordinator.json"))
        );
        assert_eq!(default_state_path_from(env(&[])), None);
    }

    proptest::proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = StateFile::decode(&bytes);
        }
    }
}
