//! `geo-bench` small and short (it starts its own redis-server): geopush's `nearby` and
//! Redis GEOSEARCH must agree on every compared query, so the tool cannot rot.

use std::process::Command;

#[test]
fn geo_bench_agrees_with_redis_on_a_small_run() {
    let cities = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gateway/testdata/cities1000-subset.csv");
    let output = Command::new(env!("CARGO_BIN_EXE_geopush-loadtest"))
        .args(["geo-bench", "--places", "2000", "--queries", "500"])
        .args(["--warmup", "100", "--compare", "200", "--radius-m", "5000"])
        .arg("--cities")
        .arg(&cities)
        .output()
        .expect("running geopush-loadtest geo-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let agreement = stdout
        .lines()
        .find(|l| l.starts_with("agreement on 200 queries:"))
        .unwrap_or_else(|| panic!("no agreement line in:\n{stdout}"));
    assert!(agreement.contains(" 0 disagree"), "{agreement}");
    assert!(stdout.contains("geopush nearby (in process)"), "{stdout}");
}
