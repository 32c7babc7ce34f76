//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// `../shared` beside the project: golden tensors, fixtures (see shared/README.md).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared")
}

pub fn golden_dir(variant: &str) -> PathBuf {
    shared_dir().join("golden").join(variant)
}

pub const VARIANTS: [&str; 4] = ["rope0_diff0", "rope0_diff1", "rope1_diff0", "rope1_diff1"];

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest absolute difference, asserting equal shapes.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    to_vec(a).iter().zip(to_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every element within `abs` absolute or `rel` relative tolerance; returns the worst offender.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, abs: f32, rel: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (g, w)) in to_vec(got).iter().zip(to_vec(want)).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= abs || err <= rel * w.abs(),
            "{what}[{i}]: got {g}, want {w} (abs err {err})"
        );
    }
}
