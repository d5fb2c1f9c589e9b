//! What a scale scenario reports: named figures with their unit, the
//! target they are held to (if any) and whether it was met, printed as a
//! table and written as JSON so runs can be compared and archived.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

/// One figure of a run.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// The target in words (`≤ 64 KiB`), and whether the value meets it.
    pub target: Option<(String, bool)>,
}

/// The figures of one scenario run, with the settings it ran with.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    settings: Value,
    figures: Vec<Figure>,
    notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str, settings: Value) -> Report {
        Report {
            scenario,
            settings,
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A figure without a target (context, or a baseline).
    pub fn add(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            target: None,
        });
    }

    /// A figure held to `value ≤ limit`.
    pub fn at_most(&mut self, name: impl Into<String>, value: f64, unit: &'static str, limit: f64) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            target: Some((format!("≤ {} {unit}", number(limit)), value <= limit)),
        });
    }

    /// A figure held to `value ≥ floor`.
    pub fn at_least(
        &mut self,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        floor: f64,
    ) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            target: Some((format!("≥ {} {unit}", number(floor)), value >= floor)),
        });
    }

    /// Something the reader needs to read the figures right.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Prints the table and writes the JSON to `json` (or, by default, to
    /// `target/bench/<scenario>.json` next to this program); returns where.
    pub fn finish(&self, json: Option<&Path>) -> anyhow::Result<PathBuf> {
        let mut table = comfy_table::Table::new();
        table.set_header(vec!["", "measured", "target", ""]);
        for f in &self.figures {
            let (target, verdict) = match &f.target {
                Some((target, true)) => (target.clone(), "met"),
                Some((target, false)) => (target.clone(), "MISSED"),
                None => (String::new(), ""),
            };
            table.add_row(vec![
                f.name.clone(),
                format!("{} {}", number(f.value), f.unit),
                target,
                verdict.to_owned(),
            ]);
        }
        println!("\n{} — {}\n{table}", self.scenario, self.settings);
        for note in &self.notes {
            println!("- {note}");
        }

        let path = match json {
            Some(path) => path.to_path_buf(),
            None => default_json_path(self.scenario)?,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "value": f.value,
                    "unit": f.unit,
                    "target": f.target.as_ref().map(|(t, _)| t),
                    "met": f.target.as_ref().map(|(_, met)| met),
                })
            })
            .collect();
        let document = json!({
            "scenario": self.scenario,
            "measured_at": chrono::Utc::now().to_rfc3339(),
            "machine": machine(),
            "settings": self.settings,
            "figures": figures,
            "notes": self.notes,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&document)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
        Ok(path)
    }
}

/// `target/bench/<scenario>.json`, next to `target/release` (or `debug`).
fn default_json_path(scenario: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("this program has no target directory")?;
    Ok(target.join("bench").join(format!("{scenario}.json")))
}

/// Rounds for reading: three significant digits, no exponent.
pub fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 6) as usize;
    format!("{v:.decimals$}")
}

/// What the figures were measured on.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_mib": memory_kib / 1024,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// Percentile `p` (0–100) of `values` by nearest rank; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn numbers_keep_three_significant_digits() {
        assert_eq!(number(1234.6), "1235");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(0.012345), "0.0123");
        assert_eq!(number(0.0), "0");
    }

    #[test]
    fn targets_say_whether_they_were_met() {
        let mut r = Report::new("t", json!({}));
        r.at_most("a", 3.0, "s", 3.0);
        r.at_least("b", 10.0, "", 15.0);
        let met: Vec<bool> = r
            .figures
            .iter()
            .map(|f| f.target.as_ref().unwrap().1)
            .collect();
        assert_eq!(met, [true, false]);
    }
}
