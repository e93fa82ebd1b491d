//! The resource check build.rs applies to every kernel: the ptxas report parser, the
//! allowlist, and a planted spilling kernel that the check must reject.

mod common;
#[path = "../build/ptxas.rs"]
#[allow(dead_code)] // to_tsv is build.rs's
mod ptxas;

use std::path::Path;
use std::process::Command;

const SAMPLE: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8192 bytes smem
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_80'
ptxas info    : Function properties for _Z5spillPf
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
";

#[test]
fn parses_registers_shared_memory_stack_and_spills() {
    let kernels = ptxas::parse("x.cu", SAMPLE);
    assert_eq!(kernels.len(), 2, "{kernels:?}");
    let good = &kernels[0];
    assert_eq!(
        (good.kernel.as_str(), good.arch.as_str()),
        ("_Z4goodPf", "sm_90")
    );
    assert_eq!(
        (good.registers, good.shared_bytes, good.stack_bytes),
        (40, 8192, 0)
    );
    assert!(!good.spills());
    let spill = &kernels[1];
    assert_eq!(
        (
            spill.registers,
            spill.stack_bytes,
            spill.spill_store_bytes,
            spill.spill_load_bytes
        ),
        (255, 24, 16, 12)
    );
    assert!(spill.spills());
}

#[test]
fn spills_and_stack_frames_are_violations_unless_allowed() {
    let kernels = ptxas::parse("x.cu", SAMPLE);
    let violations = ptxas::violations(&kernels, &[]);
    assert_eq!(violations.len(), 2, "{violations:?}"); // spill and stack of _Z5spillPf
    assert!(violations[0].contains("_Z5spillPf") && violations[0].contains("16 bytes stored"));
    assert!(violations[1].contains("24 byte stack frame"));

    let allowed = ptxas::parse_allowlist("spill spill measured: unrolled 256-wide tile\n").unwrap();
    let violations = ptxas::violations(&kernels, &allowed);
    assert_eq!(
        violations.len(),
        1,
        "only the stack frame is left: {violations:?}"
    );
    let allowed = ptxas::parse_allowlist("# both\nspill spill why\nspill stack why\n").unwrap();
    assert!(ptxas::violations(&kernels, &allowed).is_empty());
}

#[test]
fn allowlist_lines_need_a_kind_and_a_reason() {
    assert!(ptxas::parse_allowlist("decode spill")
        .unwrap_err()
        .contains("say why"));
    assert!(ptxas::parse_allowlist("decode leak because")
        .unwrap_err()
        .contains("neither spill nor stack"));
    assert!(ptxas::parse_allowlist("decode").is_err());
    assert!(ptxas::parse_allowlist("# only a comment\n\n")
        .unwrap()
        .is_empty());
}

#[test]
fn the_committed_allowlist_parses() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/resource-allowlist.txt"),
    )
    .unwrap();
    ptxas::parse_allowlist(&text).unwrap();
}

#[test]
fn a_planted_spilling_kernel_fails_the_check() {
    let Some(nvcc) = common::nvcc("a_planted_spilling_kernel_fails_the_check") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let object = std::env::temp_dir().join(format!("paged-gqa-planted-{}.o", std::process::id()));
    let output = Command::new(nvcc)
        .args([
            "-c",
            "-std=c++17",
            "-Xptxas=-v",
            "-gencode=arch=compute_90,code=sm_90",
            "-o",
        ])
        .arg(&object)
        .arg(root.join("tests/fixtures/planted_spill.cu"))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&object);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let kernels = ptxas::parse("planted_spill.cu", &String::from_utf8_lossy(&output.stderr));
    let violations = ptxas::violations(&kernels, &[]);
    assert!(
        violations
            .iter()
            .any(|v| v.contains("planted_spill") && v.contains("spills registers")),
        "{violations:?}"
    );
    assert!(
        violations
            .iter()
            .any(|v| v.contains("planted_stack") && v.contains("stack frame")),
        "{violations:?}"
    );
}

#[test]
#[allow(clippy::option_env_unwrap)] // with nvcc (checked first) build.rs always names the report
fn the_library_kernels_are_in_the_report_without_spills() {
    let Some(_) = common::nvcc("the_library_kernels_are_in_the_report_without_spills") else {
        return;
    };
    let report = option_env!("PAGED_GQA_KERNEL_REPORT")
        .expect("build.rs names the report when it builds kernels");
    let text = std::fs::read_to_string(report).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    for arch in ["sm_80", "sm_90"] {
        let row = rows
            .iter()
            .find(|r| r[2].contains("repeat_kv_kernel") && r[1] == arch)
            .unwrap_or_else(|| {
                panic!("repeat_kv_kernel for {arch} missing from the report:\n{text}")
            });
        assert_eq!(&row[5..8], &["0", "0", "0"], "stack/spills of {row:?}");
    }
}
