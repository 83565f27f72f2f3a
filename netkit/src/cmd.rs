//! Running the host's tools (`ip`, `nsenter`, `ethtool`, ...) with their output captured,
//! so a failure says which command failed and what it printed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use crate::{Error, Result};

/// Runs `cmd` to completion (stdin closed, output captured); a non-zero exit is an error
/// carrying what the command printed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        return Err(Error::Failed {
            cmd: describe(cmd),
            status: out.status,
            output: format!("{}\n{}", stderr.trim(), stdout.trim()),
        });
    }
    Ok(out)
}

/// [`run`], returning stdout as text.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    run(cmd).map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, for messages (arguments with blanks in quotes, so it can be pasted
/// into a shell).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if arg.contains(char::is_whitespace) {
                format!("'{arg}'")
            } else {
                arg.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `which`, without a dependency: `tool` in `PATH`, or in `/usr/sbin` and `/sbin`
/// (where `ip` and `ethtool` live when `PATH` is a user's).
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_its_output() {
        let err = run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .expect_err("exit 3 is a failure");
        let text = err.to_string();
        assert!(text.starts_with("`sh -c 'echo out; echo err >&2; exit 3'` failed ("));
        assert!(text.ends_with("): err\nout"), "{text}");
        assert_eq!(
            stdout(Command::new("echo").arg("hi")).ok().as_deref(),
            Some("hi\n")
        );
        assert!(matches!(
            run(&mut Command::new("/nonexistent/tool")),
            Err(Error::Spawn { .. })
        ));
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("no-such-tool-here").is_none());
    }
}
