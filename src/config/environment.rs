//! What a valid file may still meet at run time, checked by `wakegate check` before anything
//! runs: programs that cannot be found or run, working directories that do not exist, a
//! kubeconfig that cannot be read. Unlike [`super::File::validate`], this looks at the machine.

use std::path::{Path, PathBuf};

use super::target::Backend;
use super::{Config, Problem};

/// A remark on a valid configuration: likely a mistake, but not certainly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl Config {
    /// The problems this machine would cause the configuration at run time, and warnings.
    pub fn environment_problems(&self) -> (Vec<Problem>, Vec<Warning>) {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for (i, target) in self.targets.iter().enumerate() {
            let Backend::Local(local) = &target.backend else {
                continue;
            };
            let field = |name: &str| format!("target[{i}] ({}).{name}", target.name);
            if let Some(cwd) = &local.cwd
                && !cwd.is_dir()
            {
                problems.push(Problem {
                    field: field("cwd"),
                    value: format!("{:?}", cwd.display().to_string()),
                    expected: "an existing directory (the instances' working directory)".into(),
                });
            }
            if let Some(program) = local.command.first()
                && program != "wakegate"
                && let Err(expected) = find_program(program, local.cwd.as_deref(), &local.env)
            {
                problems.push(Problem {
                    field: field("command[0]"),
                    value: format!("{program:?}"),
                    expected,
                });
            }
            let mentions_port = local
                .command
                .iter()
                .any(|arg| arg.contains("{port}") || arg.contains("PORT"));
            if !mentions_port {
                warnings.push(Warning {
                    field: field("command"),
                    message: "neither `{port}` nor `PORT` appears in it: each instance must \
                              listen on the port wakegate gives it, as `{port}` in the command \
                              or `$PORT` in its environment (fine if the program reads PORT \
                              itself)"
                        .into(),
                });
            }
        }
        if let Some(path) = self.kubernetes.as_ref().and_then(|k| k.kubeconfig.as_ref())
            && let Err(error) = std::fs::File::open(path)
        {
            problems.push(Problem {
                field: "kubernetes.kubeconfig".into(),
                value: format!("{:?}", path.display().to_string()),
                expected: format!("a readable kubeconfig file ({error})"),
            });
        }
        if let Some(log) = self.access_log.as_ref().filter(|log| !log.to_stdout())
            && let Err(why) = appendable(&log.path)
        {
            problems.push(Problem {
                field: "access_log.path".into(),
                value: format!("{:?}", log.path.display().to_string()),
                expected: format!("a file wakegate can create or append to, or \"-\" ({why})"),
            });
        }
        (problems, warnings)
    }
}

/// Whether wakegate could append to the file at `path`, or create it, without creating it.
fn appendable(path: &Path) -> Result<(), String> {
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| e.to_string());
    }
    match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(format!("no directory {}", dir.display())),
        _ => Ok(()),
    }
}

/// Finds `program` as the instance's start would: a path with a `/` from `cwd` (or wakegate's
/// own working directory), a bare name on the instance's `PATH`. Err: what was expected.
fn find_program(
    program: &str,
    cwd: Option<&Path>,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = match cwd {
            Some(cwd) if Path::new(program).is_relative() => cwd.join(program),
            _ => PathBuf::from(program),
        };
        return match executable(&path) {
            Ok(()) => Ok(path),
            Err(why) => Err(format!(
                "an executable program ({why}; a relative path is taken from `cwd`, or from \
                 wakegate's working directory without one)"
            )),
        };
    }
    let search = env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|path| executable(path).is_ok())
        .ok_or_else(|| {
            format!(
                "a program on PATH ({search}) or a path to one, such as \"/usr/bin/{program}\" or \
                 \"./{program}\""
            )
        })
}

fn executable(path: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|_| "no such file")?;
    if !metadata.is_file() {
        return Err("not a file");
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err("not executable: chmod +x");
    }
    Ok(())
}
