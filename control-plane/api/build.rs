//! Compiles the control-plane API with the protoc shipped by `protoc-bin-vendored`, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/sidemesh.proto"],
        &["proto"],
    )?;
    Ok(())
}
