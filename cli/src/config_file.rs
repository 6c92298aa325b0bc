//! One configuration: a TOML file (`--config FILE`) that can carry every
//! setting of a command. Precedence, lowest first: the file, then
//! `TAILNODE_*` environment variables, then command-line flags.
//!
//! Each setting is named like its flag, with `_` or `-`: `socks5_direct =
//! true` is `--socks5-direct`, `connect_timeout = "30s"` is
//! `--connect-timeout 30s`, `forward = ["tcp:...", "udp:..."]` repeats
//! `--forward`. A list given on the command line replaces the file's list.
//!
//! The file is turned into flags placed before the user's own, so clap
//! parses and validates everything in one place; each value is checked
//! first with the flag's own parser so that an error names the file and the
//! setting.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

/// A problem with the configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, naming the setting.
    pub message: String,
}

/// The flag that names the file (and its environment variable).
pub const CONFIG_FLAG: &str = "config";
/// Environment variable for [`CONFIG_FLAG`].
pub const CONFIG_ENV: &str = "TAILNODE_CONFIG";

/// Rewrites `argv` so that the settings of the `--config` file of the
/// subcommand come first, as if given as flags, minus those overridden by
/// a flag or an environment variable. `argv` is returned unchanged when no
/// file is given.
///
/// # Errors
/// [`ConfigFileError`] for an unreadable file, bad TOML, an unknown
/// setting or a value its flag refuses.
pub fn expand(argv: Vec<OsString>, root: &Command) -> Result<Vec<OsString>, ConfigFileError> {
    // The subcommand is the first argument that names one.
    let Some((sub_pos, sub)) = argv.iter().enumerate().skip(1).find_map(|(i, a)| {
        let name = a.to_str()?;
        root.find_subcommand(name).map(|s| (i, s))
    }) else {
        return Ok(argv);
    };
    if sub.get_arguments().all(|a| a.get_id() != CONFIG_FLAG) {
        return Ok(argv);
    }
    let rest = &argv[sub_pos + 1..];
    let path = match flag_value(rest, CONFIG_FLAG) {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => return Ok(argv),
        },
    };
    let derived = settings_as_flags(&path, sub, rest)?;
    let mut out = argv[..=sub_pos].to_vec();
    out.extend(derived);
    out.extend_from_slice(rest);
    Ok(out)
}

/// The value of `--name VALUE` or `--name=VALUE` in `args`.
fn flag_value(args: &[OsString], name: &str) -> Option<OsString> {
    let long = format!("--{name}");
    let with_eq = format!("--{name}=");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let text = a.to_string_lossy();
        if text == long {
            return it.next().cloned();
        }
        if let Some(v) = text.strip_prefix(&with_eq) {
            return Some(OsString::from(v));
        }
        if text == "--" {
            break;
        }
    }
    None
}

fn given_on_command_line(args: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    let with_eq = format!("--{long}=");
    args.iter()
        .map(|a| a.to_string_lossy())
        .any(|a| a == flag || a.starts_with(&with_eq))
}

fn settings_as_flags(
    path: &Path,
    sub: &Command,
    rest: &[OsString],
) -> Result<Vec<OsString>, ConfigFileError> {
    let err = |message: String| ConfigFileError {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_id() != CONFIG_FLAG)
        else {
            let known: Vec<String> = sub
                .get_arguments()
                .filter_map(Arg::get_long)
                .filter(|l| *l != CONFIG_FLAG && *l != "help")
                .map(|l| l.replace('-', "_"))
                .collect();
            return Err(err(format!(
                "unknown setting `{key}` (settings: {})",
                known.join(", ")
            )));
        };
        if given_on_command_line(rest, &long)
            || arg
                .get_env()
                .is_some_and(|env| std::env::var_os(env).is_some_and(|v| !v.is_empty()))
        {
            continue;
        }
        let flag = OsString::from(format!("--{long}"));
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => {
                if !matches!(arg.get_action(), ArgAction::Append) {
                    return Err(err(format!("setting `{key}` takes one value, not a list")));
                }
                items.iter().collect()
            }
            v => vec![v],
        };
        for v in values {
            match (arg.get_action(), v) {
                (ArgAction::SetTrue, toml::Value::Boolean(b)) => {
                    if *b {
                        out.push(flag.clone());
                    }
                }
                (ArgAction::SetTrue, _) => {
                    return Err(err(format!("setting `{key}` must be true or false")));
                }
                (_, toml::Value::String(s)) => {
                    check(sub, arg, key, s).map_err(&err)?;
                    out.push(flag.clone());
                    out.push(OsString::from(s));
                }
                (_, toml::Value::Integer(i)) => {
                    let s = i.to_string();
                    check(sub, arg, key, &s).map_err(&err)?;
                    out.push(flag.clone());
                    out.push(OsString::from(s));
                }
                (_, other) => {
                    return Err(err(format!(
                        "setting `{key}`: expected a string or a number, got {}",
                        other.type_str()
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// Runs the flag's own value parser on `value` (through a one-argument
/// command, since clap keeps its parsers to itself).
fn check(_sub: &Command, arg: &Arg, key: &str, value: &str) -> Result<(), String> {
    let long = arg.get_long().unwrap_or_default().to_string();
    // A fresh argument with the same parser: a clone would carry relations
    // (requires, conflicts) to arguments this command does not have.
    let probe = Arg::new("value")
        .long("value")
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone());
    Command::new("check")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from(["--value".to_string(), value.to_string()])
        .map(|_| ())
        .map_err(|e| {
            let detail = e.to_string();
            let detail = detail
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
                .replace("--value <value>", &format!("--{long}"));
            format!("setting `{key}` = {value:?}: {detail}")
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{Args, Parser, Subcommand};
    use std::time::Duration;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(Debug, Subcommand)]
    enum Cmd {
        Up(TestArgs),
    }
    #[derive(Debug, Args)]
    struct TestArgs {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, env = "TAILNODE_TEST_TIMEOUT")]
        connect_timeout: Duration,
        #[arg(long)]
        socks5_direct: bool,
        #[arg(long)]
        forward: Vec<String>,
        #[arg(long)]
        port: Option<u16>,
    }

    fn parse(file: &str, flags: &[&str]) -> Result<TestArgs, String> {
        use clap::CommandFactory;
        let dir = std::env::temp_dir().join(format!(
            "tailnode-cfg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = vec![
            "t".into(),
            "up".into(),
            "--config".into(),
            path.clone().into(),
        ];
        argv.extend(flags.iter().map(OsString::from));
        let result = expand(argv, &TestCli::command())
            .map_err(|e| e.to_string())
            .and_then(|argv| TestCli::try_parse_from(argv).map_err(|e| e.to_string()));
        let _ = std::fs::remove_dir_all(&dir);
        result.map(|c| match c.cmd {
            Cmd::Up(a) => a,
        })
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let a = parse(
            "connect_timeout = \"30s\"\nsocks5-direct = true\nforward = [\"a\", \"b\"]\nport = 7\n",
            &[],
        )
        .unwrap();
        assert_eq!(a.connect_timeout, Duration::from_secs(30));
        assert!(a.socks5_direct);
        assert_eq!(a.forward, ["a", "b"]);
        assert_eq!(a.port, Some(7));
        let a = parse(
            "connect_timeout = \"30s\"\nforward = [\"a\"]\n",
            &["--connect-timeout", "2s", "--forward", "c"],
        )
        .unwrap();
        assert_eq!(a.connect_timeout, Duration::from_secs(2));
        assert_eq!(
            a.forward,
            ["c"],
            "a list on the command line replaces the file's"
        );
    }

    #[test]
    fn errors_name_the_setting() {
        let e = parse("connect_timeout = \"soon\"\n", &[]).unwrap_err();
        assert!(e.contains("connect_timeout") && e.contains("soon"), "{e}");
        let e = parse("nonsense = 1\n", &[]).unwrap_err();
        assert!(e.contains("unknown setting `nonsense`"), "{e}");
        let e = parse("socks5_direct = \"yes\"\n", &[]).unwrap_err();
        assert!(e.contains("true or false"), "{e}");
        let e = parse("port = 70000\n", &[]).unwrap_err();
        assert!(e.contains("port"), "{e}");
        let e = parse("connect_timeout = [\"1s\"]\n", &[]).unwrap_err();
        assert!(e.contains("one value"), "{e}");
        let e = parse("this is not toml", &[]).unwrap_err();
        assert!(e.contains("t.toml"), "{e}");
    }
}
