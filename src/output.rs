//! Printing records: a table for people, JSON for programs (`-o json`).

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

use crate::cli::OutputFormat;

/// Prints `items` as JSON, or as a table with the given columns.
pub fn list<T: Serialize>(
    format: OutputFormat,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(items)?),
        OutputFormat::Table => {
            if items.is_empty() {
                println!("(none)");
                return Ok(());
            }
            let mut table = Table::new();
            table
                .load_preset(UTF8_BORDERS_ONLY)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_header(header.iter().map(|h| h.to_uppercase()));
            for item in items {
                table.add_row(row(item));
            }
            println!("{table}");
        }
    }
    Ok(())
}

/// Prints one record: JSON, or `field: value` lines.
pub fn one<T: Serialize>(
    format: OutputFormat,
    item: &T,
    fields: &[(&str, String)],
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(item)?),
        OutputFormat::Table => {
            let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in fields {
                println!("{k:>width$}: {v}");
            }
        }
    }
    Ok(())
}

pub fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

pub fn short(commit: &str) -> String {
    commit.chars().take(12).collect()
}

/// A byte count for people: `512 B`, `3.1 KiB`, `412.0 MiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
