//! Compiles Falco's protos with `protox` (pure Rust, no system `protoc`) and
//! generates the tonic client and server code from the descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/outputs.proto", "proto/version.proto"];
    for file in files.iter().chain(&["proto/schema.proto"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // output_fields as a sorted map: no hashing on decode, and the JSON
        // writer needs the keys sorted anyway.
        .btree_map(".falco.outputs.response.output_fields")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
