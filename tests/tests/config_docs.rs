//! The configuration tables in `docs/operations.md` match the binaries (issue 7): every
//! option `geopush-gateway --help` and `geopush-worker --help` print appears in that
//! binary's table with the same environment variable and the same default, and the tables
//! list nothing the binary lacks.
//!
//! The docs mark each table with `<!-- config-table: BINARY -->` … `<!-- /config-table -->`;
//! a row is `| --flag | GEOPUSH_ENV | default | meaning |` (backticks optional), the default
//! `—` when unset. A switch (an option without a value) defaults to `false`.
//!
//! Needs the binaries: `cargo build --workspace --bins` first.

use anyhow::{Context, bail, ensure};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the docs or `--help` say about one flag.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Setting {
    env: Option<String>,
    /// `None`: no default (unset).
    default: Option<String>,
}

type Settings = BTreeMap<String, Setting>;

/// The options of a clap `--help` text (the long form clap prints with `--help`):
/// an option line `  --flag <VALUE>` (or a switch `  --flag`), then its description and
/// `[env: NAME=…]` / `[default: …]` lines. `--help` and `--version` are clap's own.
fn parse_help(help: &str) -> anyhow::Result<Settings> {
    let mut settings = Settings::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim();
        let option = trimmed
            .strip_prefix("-h, ")
            .or_else(|| trimmed.strip_prefix("-V, "))
            .unwrap_or(trimmed);
        if line.starts_with("  ") && option.starts_with("--") && !line.starts_with("          ") {
            let mut parts = option.split_whitespace();
            let flag = parts.next().context("option line")?.to_owned();
            let takes_value = parts.next().is_some_and(|v| v.starts_with('<'));
            let setting = Setting {
                env: None,
                default: (!takes_value).then(|| "false".to_owned()),
            };
            if settings.insert(flag.clone(), setting).is_some() {
                bail!("{flag} twice in --help");
            }
            current = Some(flag);
            continue;
        }
        let Some(flag) = &current else { continue };
        let setting = settings.get_mut(flag).context("current option")?;
        if let Some(rest) = trimmed.strip_prefix("[env: ") {
            // `[env: NAME=]`, or `[env: NAME=value]` when the variable is set.
            let name = rest.split(['=', ']']).next().unwrap_or_default();
            setting.env = Some(name.to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("[default: ") {
            let value = rest
                .strip_suffix(']')
                .context("unterminated [default: …]")?;
            setting.default = Some(value.to_owned());
        }
    }
    settings.remove("--help");
    settings.remove("--version");
    ensure!(!settings.is_empty(), "no options found in:\n{help}");
    Ok(settings)
}

/// The rows of the table marked `<!-- config-table: binary -->` in `docs`.
fn parse_docs_table(docs: &str, binary: &str) -> anyhow::Result<Settings> {
    let start_marker = format!("<!-- config-table: {binary} -->");
    let start = docs
        .find(&start_marker)
        .with_context(|| format!("no {start_marker} in the docs"))?
        + start_marker.len();
    let end = docs[start..]
        .find("<!-- /config-table -->")
        .with_context(|| format!("the table of {binary} is not closed"))?
        + start;
    let mut settings = Settings::new();
    for (n, line) in docs[start..end].lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        ensure!(
            line.starts_with('|') && line.ends_with('|'),
            "{binary} table line {}: not a table row: {line:?}",
            n + 1
        );
        let cells: Vec<&str> = line[1..line.len() - 1]
            .split('|')
            .map(|c| c.trim().trim_matches('`').trim())
            .collect();
        // The header and the separator.
        if cells.first() == Some(&"flag")
            || cells
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        ensure!(
            cells.len() == 4,
            "{binary} table line {}: expected | flag | env | default | meaning |, got {line:?}",
            n + 1
        );
        let flag = cells[0];
        ensure!(
            flag.starts_with("--"),
            "{binary} table line {}: {flag:?} is not a --flag",
            n + 1
        );
        ensure!(
            !cells[3].is_empty(),
            "{binary} table: {flag} has no meaning"
        );
        let env = match cells[1] {
            "" | "—" | "-" => None,
            name => Some(name.to_owned()),
        };
        let default = match cells[2] {
            "—" | "-" | "" => None,
            value => Some(value.to_owned()),
        };
        if settings
            .insert(flag.to_owned(), Setting { env, default })
            .is_some()
        {
            bail!("{binary} table lists {flag} twice");
        }
    }
    Ok(settings)
}

/// Every difference between what `--help` says and what the docs say.
fn compare(binary: &str, help: &Settings, docs: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    for (flag, from_help) in help {
        match docs.get(flag) {
            None => problems.push(format!(
                "{binary} {flag} (env {:?}, default {:?}) is missing from docs/operations.md",
                from_help.env, from_help.default
            )),
            Some(documented) if documented != from_help => problems.push(format!(
                "{binary} {flag}: --help says env {:?} default {:?}, the docs say env {:?} default {:?}",
                from_help.env, from_help.default, documented.env, documented.default
            )),
            Some(_) => {}
        }
    }
    for flag in docs.keys().filter(|f| !help.contains_key(*f)) {
        problems.push(format!(
            "{binary}: docs/operations.md lists {flag}, which --help does not have"
        ));
    }
    problems
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary is not in target/<profile>/deps")?
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first",
        path.display()
    );
    Ok(path)
}

/// `BINARY --help`, with no GEOPUSH_* variable from the shell (clap would print its value).
fn help_of(name: &str) -> anyhow::Result<String> {
    let mut command = Command::new(binary(name)?);
    command.arg("--help");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("GEOPUSH_")) {
        command.env_remove(key);
    }
    let output = command.output().with_context(|| format!("{name} --help"))?;
    ensure!(
        output.status.success(),
        "{name} --help failed: {}",
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn operations_md() -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("operations.md");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn every_config_value_of_both_binaries_is_documented_with_its_default() {
    let docs = operations_md().expect("docs/operations.md");
    let mut problems = Vec::new();
    for name in ["geopush-gateway", "geopush-worker"] {
        let help = parse_help(&help_of(name).expect("--help")).expect("parsing --help");
        assert!(
            help.len() > 10 && help.values().all(|s| s.env.is_some()),
            "{name}: every option has a GEOPUSH_* variable: {help:?}"
        );
        let documented = parse_docs_table(&docs, name).unwrap_or_else(|e| panic!("{e:#}"));
        problems.extend(compare(name, &help, &documented));
    }
    assert!(
        problems.is_empty(),
        "docs/operations.md is out of date:\n{}",
        problems.join("\n")
    );
}

/// A fixture in clap's long help format: a value with a default, one without, a switch, an
/// env variable that is set in the environment, and clap's own flags.
const HELP: &str = "\
Usage: x [OPTIONS]

Options:
      --listen <LISTEN>
          Address
          
          [env: GEOPUSH_LISTEN=]
          [default: 127.0.0.1:8080]

      --node-id <NODE_ID>
          Name
          
          [env: GEOPUSH_NODE_ID=gw-7]

      --redis-cluster
          Cluster
          
          [env: GEOPUSH_REDIS_CLUSTER=]

      --log-format <LOG_FORMAT>
          Log format

          Possible values:
          - auto:   JSON when stderr is not a terminal, pretty otherwise
          - json
          
          [env: GEOPUSH_LOG_FORMAT=]
          [default: auto]

  -h, --help
          Print help (see a summary with '-h')

  -V, --version
          Print version
";

const GOOD_DOCS: &str = "\
<!-- config-table: x -->
| flag | env | default | meaning |
|---|---|---|---|
| `--listen` | `GEOPUSH_LISTEN` | `127.0.0.1:8080` | address |
| `--node-id` | `GEOPUSH_NODE_ID` | — | name |
| `--redis-cluster` | `GEOPUSH_REDIS_CLUSTER` | `false` | cluster |
| `--log-format` | `GEOPUSH_LOG_FORMAT` | `auto` | format |
<!-- /config-table -->
";

#[test]
fn the_check_refuses_doctored_docs() {
    let help = parse_help(HELP).expect("parses");
    assert_eq!(
        help.keys().collect::<Vec<_>>(),
        ["--listen", "--log-format", "--node-id", "--redis-cluster"]
    );
    assert_eq!(
        help["--node-id"],
        Setting {
            env: Some("GEOPUSH_NODE_ID".into()),
            default: None
        }
    );
    assert_eq!(help["--redis-cluster"].default.as_deref(), Some("false"));
    let good = parse_docs_table(GOOD_DOCS, "x").expect("parses");
    assert_eq!(compare("x", &help, &good), Vec::<String>::new());

    let doctored = [
        // a wrong default
        GOOD_DOCS.replace("`127.0.0.1:8080`", "`0.0.0.0:8080`"),
        // a default where there is none
        GOOD_DOCS.replace("`GEOPUSH_NODE_ID` | —", "`GEOPUSH_NODE_ID` | `gw`"),
        // a wrong variable
        GOOD_DOCS.replace("`GEOPUSH_LISTEN`", "`GEOPUSH_LISTEN_ADDR`"),
        // a missing row
        GOOD_DOCS.replace(
            "| `--log-format` | `GEOPUSH_LOG_FORMAT` | `auto` | format |\n",
            "",
        ),
        // a flag the binary does not have
        GOOD_DOCS.replace(
            "<!-- /config-table -->",
            "| `--max-widgets` | `GEOPUSH_MAX_WIDGETS` | `3` | widgets |\n<!-- /config-table -->",
        ),
    ];
    for docs in &doctored {
        let table = parse_docs_table(docs, "x").expect("still a table");
        assert!(
            !compare("x", &help, &table).is_empty(),
            "not refused:\n{docs}"
        );
    }
    // Broken tables are errors, not silently empty.
    assert!(parse_docs_table("no table here", "x").is_err());
    assert!(parse_docs_table(&GOOD_DOCS.replace("<!-- /config-table -->", ""), "x").is_err());
    assert!(parse_docs_table(&GOOD_DOCS.replace("| format |", "|"), "x").is_err());
    assert!(parse_docs_table(&GOOD_DOCS.replace("| `--listen` |", "| listen |"), "x").is_err());
}
