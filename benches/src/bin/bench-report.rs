//! `bench-report ROWS DIR`: the benchmark table. Reads the rows the benches appended to
//! `ROWS` (one JSON object per line) and writes `DIR/report.json` (all rows) and
//! `DIR/report.md` (one table: vmkit, baseline, ratio, target, runs).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use vmkit_benches::Row;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [rows, dir] = args.as_slice() else {
        eprintln!("usage: bench-report ROWS DIR");
        return ExitCode::from(2);
    };
    match report(rows, dir) {
        Ok(count) => {
            println!(
                "{count} rows: {} and {}",
                dir.join("report.md").display(),
                dir.join("report.json").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(rows: &std::path::Path, dir: &std::path::Path) -> Result<usize, String> {
    let text =
        std::fs::read_to_string(rows).map_err(|e| format!("read {}: {e}", rows.display()))?;
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("a bad row {l:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))
    };
    write("report.json", &json)?;
    write("report.md", &markdown(&rows))?;
    Ok(rows.len())
}

/// The table, one row per figure.
fn markdown(rows: &[Row]) -> String {
    let mut md = String::from(
        "# vmkit benchmarks\n\nEach figure against a baseline measured in the same run \
         (`cargo xtask bench`).\n\n\
         | bench | what | vmkit | baseline | ratio | target | runs |\n\
         |---|---|---:|---|---:|---|---:|\n",
    );
    for row in rows {
        let baseline = match (&row.baseline_name, row.baseline) {
            (Some(name), Some(value)) => format!("{name}: {} {}", figure(value), row.unit),
            _ => "-".to_owned(),
        };
        let target = match (&row.target, row.met) {
            (Some(t), Some(true)) => format!("{t} (met)"),
            (Some(t), Some(false)) => format!("{t} (**missed**)"),
            (Some(t), None) => t.clone(),
            (None, _) => "-".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {} | {} | {} | {} |",
            row.bench,
            row.what.replace('|', "\\|"),
            figure(row.vmkit),
            row.unit,
            baseline.replace('|', "\\|"),
            row.ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
            target,
            row.runs
        );
    }
    md
}

/// A figure with as many decimals as its size needs.
fn figure(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
