//! src/ffi.rs is bindgen's output for kernels/include/paged_gqa.h, committed so that building
//! the crate needs no libclang. This test regenerates it and fails when the committed file is
//! stale. `PAGED_GQA_BLESS=1 cargo test --test ffi_bindings` rewrites it.
//!
//! libclang: `LIBCLANG_PATH`, else the copy scripts/install-toolchain puts in .toolchain/.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    if std::env::var_os("LIBCLANG_PATH").is_none() {
        let local = root().join(".toolchain/libclang/clang/native");
        assert!(
            local.join("libclang.so").is_file(),
            "no libclang: set LIBCLANG_PATH or run scripts/install-toolchain"
        );
        std::env::set_var("LIBCLANG_PATH", local);
    }
    let header = root().join("kernels/include/paged_gqa.h");
    bindgen::Builder::default()
        .header(header.to_str().unwrap())
       .allowlist_item("(pgqa|PGQA)_.*")
        .default_enum_style(bindgen::EnumVariation::NewType {
            is_bitfield: false,
            is_global: false,
        })
        .prepend_enum_name(false)
        .layout_tests(true)
        .use_core()
        .raw_line("//! Raw bindings of kernels/include/paged_gqa.h (bindgen output, committed;")
        .raw_line("//! tests/ffi_bindings.rs fails when it is stale). Everything here is unsafe to")
        .raw_line("//! call: the safe API in `cuda` validates arguments before it calls in.")
        // Shapes like `[num_tokens]` in the header comments are not links.
        .raw_line("#![allow(non_camel_case_types, non_upper_case_globals, clippy::all, rustdoc::broken_intra_doc_links)]")
        .generate()
        .expect("bindgen ran on kernels/include/paged_gqa.h")
        .to_string()
}

#[test]
fn committed_ffi_bindings_match_the_header() {
    let fresh = generate();
    let path: &Path = &root().join("src/ffi.rs");
    if std::env::var("PAGED_GQA_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == fresh,
        "src/ffi.rs is stale: kernels/include/paged_gqa.h changed. \
         Run `PAGED_GQA_BLESS=1 cargo test --test ffi_bindings` and commit src/ffi.rs."
    );
}
