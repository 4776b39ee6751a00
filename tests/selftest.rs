//! `dreambooth selftest` on the CPU: the checks it runs on a GPU machine
//! pass here, and the mixed-precision check measures a real f16 run.

use candle_core::Device;

#[test]
fn selftest_passes_on_the_cpu_and_measures_f16() {
    let checks = dreambooth::selftest::run(&Device::Cpu, &mut |l| println!("{l}")).unwrap();
    assert_eq!(checks.len(), 42);
    for c in &checks {
        assert!(c.passed(), "{}: {:.2e} > {:.0e}", c.name, c.rel_err, c.tol);
    }
    let f16: Vec<_> = checks.iter().filter(|c| c.name.contains("f16")).collect();
    assert_eq!(f16.len(), 12);
    for c in f16 {
        // f16 rounding shows: the check compared two different computations.
        assert!(c.rel_err > 1e-5, "{}: {:.2e}", c.name, c.rel_err);
    }
}

#[test]
fn selftest_cli_reports_counts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["selftest", "--device", "cpu"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("42 passed, 0 failed"), "{stdout}");
}
