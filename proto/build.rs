//! Compiles `ledger/v1/ledger.proto` into the Rust client and server, plus the descriptor set
//! that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc is not installed on the build machines; the vendored one always is.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ledger_descriptor.bin"))
        .compile_protos(&["ledger/v1/ledger.proto"], &["."])?;
    println!("cargo:rerun-if-changed=ledger/v1/ledger.proto");
    Ok(())
}
