//! Generates the gRPC services wakegate serves or tests with (client and server) from their
//! `.proto` files, with the `protoc` that `protoc-bin-vendored` ships, so that building needs
//! only the Rust toolchain: the demo backend's echo service and KEDA's external scaler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/wakegate/demo/v1/echo.proto",
        "proto/externalscaler/externalscaler.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // SAFETY: the build script is single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
