//! A small Prometheus / OpenMetrics text parser that also validates: every sample line is
//! `name{labels} value [timestamp]` with a parseable float, every comment is `HELP`, `TYPE`,
//! `UNIT` or `EOF`, and every sample belongs to a family declared by a `TYPE` line.

use anyhow::{Context, bail};
use std::collections::{BTreeMap, HashMap};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → type (`counter`, `gauge`, `histogram`, …).
    pub types: HashMap<String, String>,
}

/// Suffixes a sample name may add to its family's name.
const SUFFIXES: [&str; 6] = ["_total", "_bucket", "_sum", "_count", "_created", "_info"];

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> anyhow::Result<f64> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text
            .parse::<f64>()
            .with_context(|| format!("value {text:?} is not a float")),
    }
}

/// Parse `{a="x",b="y"}` starting at the `{`; returns the labels and the rest of the line.
fn parse_labels(text: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').context("labels must start with {")?;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').context("label without =")?;
        let key = &rest[..eq];
        if !valid_name(key) {
            bail!("bad label name {key:?}");
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .context("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => bail!("bad escape in label value: {other:?}"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &rest[end + 1..];
        if !(rest.starts_with(',') || rest.starts_with('}')) {
            bail!("expected , or }} after a label, got {rest:?}");
        }
    }
}

impl Exposition {
    /// Parse and validate a whole exposition.
    pub fn parse(text: &str) -> anyhow::Result<Exposition> {
        let mut exposition = Exposition::default();
        for (number, line) in text.lines().enumerate() {
            exposition
                .parse_line(line)
                .with_context(|| format!("metrics line {}: {line:?}", number + 1))?;
        }
        for sample in &exposition.samples {
            if exposition.family_of(&sample.name).is_none() {
                bail!("sample {} has no TYPE line", sample.name);
            }
        }
        Ok(exposition)
    }

    fn parse_line(&mut self, line: &str) -> anyhow::Result<()> {
        if line.trim().is_empty() {
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("EOF"), None, None) => {}
                (Some("HELP" | "UNIT"), Some(name), _) if valid_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind)) if valid_name(name) => {
                    let kind = kind.trim();
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "untyped",
                        "unknown",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ];
                    if !known.contains(&kind) {
                        bail!("unknown metric type {kind:?}");
                    }
                    self.types.insert(name.to_owned(), kind.to_owned());
                }
                _ => bail!("comment is not HELP, TYPE, UNIT or EOF"),
            }
            return Ok(());
        }
        let name_end = line.find(['{', ' ']).context("sample without a value")?;
        let name = &line[..name_end];
        if !valid_name(name) {
            bail!("bad metric name {name:?}");
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().context("sample without a value")?)?;
        if let Some(timestamp) = fields.next() {
            parse_value(timestamp).context("timestamp")?;
        }
        if fields.next().is_some() {
            bail!("trailing fields after value and timestamp");
        }
        self.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
        Ok(())
    }

    /// The family a sample name belongs to (itself, or itself minus a known suffix).
    pub fn family_of(&self, sample_name: &str) -> Option<&str> {
        if let Some((name, _)) = self.types.get_key_value(sample_name) {
            return Some(name);
        }
        SUFFIXES.iter().find_map(|suffix| {
            let base = sample_name.strip_suffix(suffix)?;
            self.types
                .get_key_value(base)
                .map(|(name, _)| name.as_str())
        })
    }

    /// The type declared for a family.
    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }

    /// The sample with exactly this name and these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }

    /// Like [`Exposition::get`], 0 when absent (a labelled counter not yet incremented).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let text = "# HELP a_total things\n# TYPE a counter\na_total 3\n\
                    # TYPE b gauge\nb{code=\"40\\\"9\",x=\"y\"} -1.5e3\n# EOF\n";
        let m = Exposition::parse(text).expect("valid");
        assert_eq!(m.get("a_total", &[]), Some(3.0));
        assert_eq!(m.get("b", &[("code", "40\"9"), ("x", "y")]), Some(-1500.0));
        assert_eq!(m.get("b", &[("code", "40\"9")]), None);
        assert_eq!(m.value("c", &[]), 0.0);
    }

    #[test]
    fn refuses_bad_lines() {
        for bad in [
            "# TYPE a counter\na_total x\n",
            "# TYPE a counter\na_total\n",
            "undeclared 1\n",
            "# TYPE a counter\na{b=1} 1\n",
            "# random comment\n",
            "# TYPE a counter\na_total 1 2 3\n",
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad:?}");
        }
    }
}
