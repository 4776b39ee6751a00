//! The kernel profiler's aggregation (`tools/cuda/kprof/kprof_report.h`:
//! records inside the capture windows, summed per name, GPU-busy time as the
//! union of their intervals) checked without a GPU: g++ builds
//! `report_test.cpp` and this runs it. The CUPTI side needs a GPU; its
//! output is this code's table.

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn kprof_report_windows_busy_time_and_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tools/cuda/kprof");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kprof_report_test");
    let status = Command::new("g++")
        .args(["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror"])
        .arg(dir.join("report_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("g++ runs (the kprof report test needs a C++17 compiler)");
    assert!(status.success(), "g++ failed on report_test.cpp");
    let out = Command::new(&exe).output().expect("run the report test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "report_test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.ends_with("ok\n"), "{stdout}");
    // The table: 4 records in 360 ns of windows, 220 ns busy (61.1%), per 2
    // steps; the top row is gemm (3 calls, 250 ns of 270 summed: 92.6%).
    assert!(stdout.contains("GPU busy 0.000 ms (61.1%)"), "{stdout}");
    assert!(stdout.contains("4 records, per 2"), "{stdout}");
    let gemm = stdout
        .lines()
        .find(|l| l.ends_with(" gemm"))
        .expect("a gemm row");
    let cols: Vec<&str> = gemm.split_whitespace().collect();
    assert_eq!(cols[2], "92.6", "{gemm}");
    assert_eq!(cols[3], "1.5", "{gemm}"); // 3 calls over 2 steps
    assert_eq!(cols[4], "0.08", "{gemm}"); // 250 ns / 3 calls in µs
    assert!(stdout.contains("(other 1 names)"), "{stdout}");
}
