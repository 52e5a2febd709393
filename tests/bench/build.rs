//! Compiles `proto/etcd/rpc.proto`, the part of etcd's v3 API that `--against etcd` calls, into
//! a tonic client (no server: the benchmark runs the real etcd).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc is not installed on the build machines; the vendored one always is (as in
    // proto/build.rs).
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Keys and values as Vec<u8>, as etcd's `bytes` are.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &["proto/etcd/rpc.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/etcd/rpc.proto");
    Ok(())
}
