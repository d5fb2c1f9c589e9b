//! Printing records: a table for people, JSON or YAML for programs (`-o
//! json`, `-o yaml`).

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
        OutputFormat::Json | OutputFormat::Yaml => {
            machine(format, &items)?;
        }
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
        OutputFormat::Json | OutputFormat::Yaml => {
            machine(format, item)?;
        }
        OutputFormat::Table => {
            let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in fields {
                println!("{k:>width$}: {v}");
            }
        }
    }
    Ok(())
}

/// Prints `value` as JSON or YAML when `format` asks for one of them, and
/// says whether it did (a table is the caller's to print).
pub fn machine<T: Serialize + ?Sized>(format: OutputFormat, value: &T) -> anyhow::Result<bool> {
    match format {
        OutputFormat::Table => Ok(false),
        OutputFormat::Json => {
            println!("{}", serde_json::to_string_pretty(value)?);
            Ok(true)
        }
        OutputFormat::Yaml => {
            print!("{}", yaml(value)?);
            Ok(true)
        }
    }
}

/// `value` as a YAML document. Serialised through JSON first, so YAML and
/// JSON output carry the same fields under the same names.
pub fn yaml<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    let value = serde_json::to_value(value)?;
    let mut text = serde_saphyr::to_string(&value)?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

pub fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    trellis_model::display::time(*t)
}

pub fn short(commit: &str) -> String {
    commit.chars().take(12).collect()
}

pub use trellis_model::display::bytes;
