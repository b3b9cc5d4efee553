//! camflow's Grad-CAM against the reference implementation (pytorch-grad-cam).
//!
//! `tests/reference/make_fixture.py` (run by hand) saved PyTorch `vgg-small` weights in
//! camflow's safetensors naming, a few inputs, and the heatmaps pytorch-grad-cam computed for
//! them. Here camflow loads the same weights and must agree within 1e-4 (max absolute
//! difference, before any quantisation).

use burn::backend::{Autodiff, Flex};
use camflow::ml::dataset::{Dataset, Sample, Split};
use camflow::ml::gradcam::{CamMethod, CamTarget, heatmaps};
use camflow::ml::model::ArchConfig;
use camflow::ml::weights::from_safetensors;

#[test]
fn gradcam_matches_pytorch_grad_cam() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("fixture.json")).expect("fixture.json")).expect("json");
    let weights = std::fs::read(dir.join("vgg_small.safetensors")).expect("weights");
    let size = fixture["size"].as_u64().expect("size") as usize;
    let inputs: Vec<Vec<f32>> = fixture["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|r| r.as_array().expect("row").iter().map(|v| v.as_f64().expect("f") as f32).collect())
        .collect();
    let samples = inputs
        .iter()
        .enumerate()
        .map(|(i, img)| Sample {
            id: format!("x{i}"),
            group: format!("g{i}"),
            label: 1,
            split: Split::Test,
            image: img.clone(),
            mask: vec![0; size * size],
        })
        .collect();
    let ds = Dataset { channels: 1, height: size, width: size, samples };
    let dev = Default::default();
    let arch = ArchConfig::vgg_small(1);
    let model = from_safetensors::<Autodiff<Flex>>(&arch, &weights, &dev).expect("load weights");
    let idx: Vec<usize> = (0..ds.samples.len()).collect();
    for (name, method) in [("gradcam", CamMethod::GradCam), ("gradcam++", CamMethod::GradCamPlusPlus), ("hirescam", CamMethod::HiResCam)] {
        let ours = heatmaps(&model, &ds, &idx, 3, method, CamTarget::Class(1), 2);
        let expected = fixture[name].as_array().expect("method");
        let mut max = 0f64;
        for (o, e) in ours.iter().zip(expected) {
            for (a, b) in o.iter().zip(e.as_array().expect("row")) {
                max = max.max((*a as f64 - b.as_f64().expect("f")).abs());
            }
        }
        // The heatmaps are not trivial (some spread of values), so agreement means something.
        let spread = ours[0].iter().cloned().fold(f32::MIN, f32::max) - ours[0].iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 0.5, "{name}: flat heatmap");
        eprintln!("{name}: max abs difference {max:e}");
        assert!(max < 1e-4, "{name}: max |camflow - pytorch-grad-cam| = {max:e}");
    }
}
