//! `tailnode` processes for tests: config files in a scratch directory, logs
//! captured to files, killed on drop.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tailnode_wg::{PrivateKey, PublicKey};

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tailnode-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write scratch file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TAILNODE_KEEP_TEST_FILES").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A `[Peer]` of a wg-quick file.
#[derive(Debug, Clone)]
pub struct WgPeer {
    pub public_key: PublicKey,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    pub persistent_keepalive: Option<u16>,
}

/// The text of a wg-quick file.
pub fn wg_quick(
    key: &PrivateKey,
    addresses: &[&str],
    listen_port: u16,
    peers: &[WgPeer],
) -> String {
    let mut s = String::new();
    writeln!(s, "[Interface]").unwrap();
    writeln!(s, "PrivateKey = {}", key.to_base64()).unwrap();
    writeln!(s, "Address = {}", addresses.join(", ")).unwrap();
    writeln!(s, "ListenPort = {listen_port}").unwrap();
    for p in peers {
        writeln!(s, "\n[Peer]").unwrap();
        writeln!(s, "PublicKey = {}", p.public_key).unwrap();
        writeln!(s, "AllowedIPs = {}", p.allowed_ips.join(", ")).unwrap();
        if let Some(e) = &p.endpoint {
            writeln!(s, "Endpoint = {e}").unwrap();
        }
        if let Some(k) = p.persistent_keepalive {
            writeln!(s, "PersistentKeepalive = {k}").unwrap();
        }
    }
    s
}

/// A running child process (usually `tailnode`), killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub log_path: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `program args...` with stdout and stderr going to `log_path`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log_path: PathBuf,
    ) -> Self {
        let log = std::fs::File::create(&log_path).expect("create log file");
        let log2 = log.try_clone().expect("clone log file");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            child: Some(child),
            log_path,
            name: name.to_string(),
        }
    }

    /// Starts `tailnode args...`.
    pub fn tailnode(name: &str, dir: &TempDir, args: &[String]) -> Self {
        Self::spawn(
            name,
            &crate::tailnode_bin(),
            args,
            &[],
            dir.path().join(format!("{name}.log")),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `signal` (e.g. "TERM", "INT", "KILL") and waits up to `timeout`
    /// for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
        }
    }
}
