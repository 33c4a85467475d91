//! Renders charts/keyway as `helm template` would, with the project's own
//! renderer (the `helm` binary is not installable here): used by
//! scripts/local-cluster.sh to install Keyway into the local cluster.
//!
//!     render-chart RELEASE NAMESPACE CHART_DIR [VALUES.yaml]

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [release, namespace, chart, rest @ ..] = args.as_slice() else {
        eprintln!("usage: render-chart RELEASE NAMESPACE CHART_DIR [VALUES.yaml]");
        return ExitCode::from(2);
    };
    let overrides = match rest.first() {
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("render-chart: {path}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => serde_yaml::Value::Mapping(Default::default()),
    };
    match keyway_tests::helm::render(std::path::Path::new(chart), release, namespace, &overrides) {
        Ok(rendered) => {
            for r in rendered {
                println!("---\n# Source: {}\n{}", r.template, r.manifest.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("render-chart: {e}");
            ExitCode::FAILURE
        }
    }
}
