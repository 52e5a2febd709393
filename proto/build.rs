//! Compiles `ledger/v1/ledger.proto` into the Rust messages and client, the server, and the
//! descriptor set that server reflection serves.

use std::path::PathBuf;

const PROTO: &str = "ledger/v1/ledger.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc is not installed on the build machines; the vendored one always is.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let config = || {
        let mut config = tonic_prost_build::Config::new();
        config.protoc_executable(&protoc);
        config
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The messages and the client, for every client (the member, the tests, a relay's upstream).
    tonic_prost_build::configure()
        .build_server(false)
        .file_descriptor_set_path(out_dir.join("ledger_descriptor.bin"))
        .compile_with_config(config(), &[PROTO], &["."])?;
    // The server, on its own: the same messages (from `crate::pb`), except that `StreamLedger`
    // answers `crate::server::StreamLedgerFrame`, which can carry an encoding made once and
    // shared by every subscriber. The wire format is the same.
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_dir)
        .extern_path(".ledger.v1", "crate::pb")
        .extern_path(
            ".ledger.v1.StreamLedgerResponse",
            "crate::server::StreamLedgerFrame",
        )
        .compile_with_config(config(), &[PROTO], &["."])?;
    println!("cargo:rerun-if-changed={PROTO}");
    Ok(())
}
