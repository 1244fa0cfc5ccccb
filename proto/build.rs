//! Generates the protocol's Rust code with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "lockstep/v1/cluster.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        // Tensors are large: share them as `bytes::Bytes` instead of copying into Vec<u8>.
        .bytes(".lockstep.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
