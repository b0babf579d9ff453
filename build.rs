//! Compiles Falco's protos with `protox` (pure Rust, no system `protoc`) and
//! generates the tonic client and server code from the descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/outputs.proto", "proto/version.proto"];
    for file in files.iter().chain(&["proto/schema.proto"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
