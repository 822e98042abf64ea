//! Generates the gRPC code from `proto/convoy.proto` with protox, a pure-Rust
//! protobuf compiler, so a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/convoy.proto");
    let fds = protox::compile(["convoy.proto"], ["proto"])?;
    // Artifact chunks as `Bytes`: decoding slices the received buffer
    // instead of copying each chunk into a new vector.
    tonic_prost_build::configure()
        .bytes(".convoy.v1.Chunk.data")
        .bytes(".convoy.v1.ContentPiece.data")
        .compile_fds(fds)?;
    Ok(())
}
