//! Generates tonic servers and clients for the CSI spec and Cairn's own APIs
//! at build time with a vendored `protoc`, so no system protoc is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded, so setting the variable is sound.
    env::set_var("PROTOC", protoc);

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = ["csi/csi.proto", "engine.proto", "agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Kept for gRPC server reflection (`cairn_proto::FILE_DESCRIPTOR_SET`).
        .file_descriptor_set_path(out_dir.join("cairn_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
