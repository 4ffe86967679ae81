//! The data path end to end: the shipped demo topology from the binary, and bad input rows that
//! must end as counted rejections, never as a crash or a silent loss.

use latentflow_tests::{latentflow, text, topology};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

#[test]
fn the_demo_topology_writes_crops_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    let demo = topology("demo.toml");
    let out = latentflow(
        BIN,
        dir.path(),
        &[
            "run",
            demo.to_str().unwrap(),
            "--set",
            "nodes.read.count=12",
            "--set",
            "nodes.read.batch_size=4",
            "--set",
            "nodes.transform.resolution=64",
            "--workers",
            "2",
            "--profile",
            "p.json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let images = dir.path().join("runs/demo/images");
    for key in 0..12 {
        let png = image::open(images.join(format!("{key}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (64, 64));
        let caption = std::fs::read_to_string(images.join(format!("{key}.txt"))).unwrap();
        assert!(caption.contains(" on a ") && caption.ends_with("background"), "{caption}");
    }
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
    let tokenize = &profile["operators"][2];
    assert_eq!((tokenize["id"].as_str(), tokenize["items_out"].as_u64()), (Some("tokenize"), Some(12)));
}
