//! Generates the demo backend's gRPC service (client and server) from its `.proto`, with the
//! `protoc` that `protoc-bin-vendored` ships, so that building needs only the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wakegate/demo/v1/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    // SAFETY: the build script is single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure().compile_protos(&[proto], &["proto"])?;
    Ok(())
}
