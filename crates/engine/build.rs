//! Sets `wide_tiles` when the build target has AVX-512 with VNNI: the quantized kernels
//! (`src/quant.rs`) then run on 512-bit registers, in tiles of 16 rows.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(wide_tiles)");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let has = |wanted: &str| features.split(',').any(|f| f == wanted);
    if ["avx2", "fma", "avx512f", "avx512bw", "avx512vnni"]
        .iter()
        .all(|f| has(f))
    {
        println!("cargo::rustc-cfg=wide_tiles");
    }
}
