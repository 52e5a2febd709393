//! Compiles `ledger/v1/ledger.proto` and `ledger/v1/errors.proto` into the Rust messages and
//! client, the server, and the descriptor set that server reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &["ledger/v1/ledger.proto", "ledger/v1/errors.proto"];

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
        .compile_with_config(config(), PROTOS, &["."])?;
    // The server, on its own: the same messages (from `crate::pb`), except that `StreamLedger`
    // answers `crate::server::StreamLedgerFrame`, which can carry an encoding made once and
    // shared by every subscriber. The wire format is the same. Its codec answers a request that
    // does not decode with INVALID_ARGUMENT and a reason (tonic's says INTERNAL).
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
        .codec_path("crate::server::LedgerCodec")
        .compile_with_config(config(), PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
