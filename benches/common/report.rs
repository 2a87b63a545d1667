//! What the report benches (`ratios`, `fleet`) share: a row's target, the median and spread of
//! rounds, and the JSON file they write.

use std::path::PathBuf;

/// A row's target: the value must be at most, or at least, this.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    pub fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(t) => v <= t,
            Target::AtLeast(t) => v >= t,
        }
    }
    pub fn value(self) -> f64 {
        match self {
            Target::AtMost(t) | Target::AtLeast(t) => t,
        }
    }
    pub fn cmp(self) -> &'static str {
        match self {
            Target::AtMost(_) => "<=",
            Target::AtLeast(_) => ">=",
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// Writes `json` to `file` in the target directory; says what became of it.
pub fn write_json(file: &str, json: &serde_json::Map<String, serde_json::Value>) -> String {
    let path: PathBuf = super::target_dir().join(file);
    std::fs::create_dir_all(super::target_dir())
        .and_then(|()| {
            std::fs::write(
                &path,
                serde_json::to_string_pretty(json).expect("JSON") + "\n",
            )
        })
        .map(|()| format!("wrote {}", path.display()))
        .unwrap_or_else(|e| format!("could not write {}: {e}", path.display()))
}

/// Prints the table's header: `first` names the first column, `width` wide.
pub fn print_header(first: &str, width: usize) {
    println!(
        "\n{first:<width$} {:>12} {:>12}  {:<6} detail",
        "value", "target", "result"
    );
}

/// Prints one row of the table; returns its JSON entry (value, target, comparison, pass) and
/// whether it met its target.
pub fn print_row(
    name: &str,
    width: usize,
    value: f64,
    target: Target,
    detail: &str,
) -> (serde_json::Value, bool) {
    let pass = target.met(value);
    let shown = if value >= 1000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    };
    println!(
        "{name:<width$} {shown:>12} {:>3}{:>9}  {:<6} {detail}",
        target.cmp(),
        target.value(),
        if pass { "PASS" } else { "FAIL" },
    );
    let entry = serde_json::json!({
        "value": value,
        "target": target.value(),
        "cmp": target.cmp(),
        "pass": pass,
    });
    (entry, pass)
}
