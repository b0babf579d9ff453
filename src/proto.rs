//! Rust types and tonic stubs generated from Falco's protos in `proto/`.
//!
//! Falco's RPC and message names are lower case, so the generated code has
//! names such as `subStream`; the lints for them are allowed here only.

#[allow(non_camel_case_types, clippy::all, missing_docs)]
pub mod schema {
    tonic::include_proto!("falco.schema");
}

#[allow(non_camel_case_types, clippy::all, missing_docs)]
pub mod outputs {
    tonic::include_proto!("falco.outputs");
}

#[allow(non_camel_case_types, clippy::all, missing_docs)]
pub mod version {
    tonic::include_proto!("falco.version");
}
