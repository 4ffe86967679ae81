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

mod bad_input {
    use std::collections::BTreeMap;
    use std::io::Cursor;
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use latentflow_engine::{run, Plan, RunOptions};
    use latentflow_operators::tables::AtomicParquetWriter;
    use latentflow_tests::testops::{catalog, probe};

    fn encode(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    /// A PNG whose header claims `side` x `side` pixels (with a valid checksum) and whose body
    /// is a few bytes: a decompression bomb's header.
    fn bomb_png(side: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut crc = flate2::Crc::new();
        crc.update(&ihdr);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc.sum().to_be_bytes());
        png.extend_from_slice(b"\0\0\0\0IDAT\0\0\0\0");
        png
    }

    /// The corpus: (key, caption, image bytes, what must happen).
    fn corpus() -> Vec<(i64, Option<String>, Vec<u8>, &'static str)> {
        let photo =
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(96, 72, |x, y| image::Rgb([x as u8, y as u8, 90])));
        let jpeg = encode(photo.clone(), image::ImageFormat::Jpeg);
        let mut corrupt = jpeg.clone();
        for b in corrupt.iter_mut().skip(jpeg.len() / 3).take(200) {
            *b = 0xFF; // keeps the header, breaks the entropy-coded body
        }
        vec![
            (1, Some("a good photo".into()), jpeg.clone(), "ok"),
            (2, Some("zero bytes".into()), Vec::new(), "empty_image"),
            (3, Some("truncated".into()), jpeg[..jpeg.len() / 2].to_vec(), "decode_failed"),
            (4, Some("not an image".into()), b"<html>404 not found</html>".to_vec(), "not_an_image"),
            (5, Some("corrupt body".into()), corrupt, "decode_failed"),
            (6, Some("a bomb".into()), bomb_png(40_000), "too_many_pixels"),
            (7, Some("one pixel".into()), encode(image::DynamicImage::new_rgb8(1, 1), image::ImageFormat::Png), "ok"),
            (
                8,
                Some("very wide".into()),
                encode(image::DynamicImage::new_rgb8(3000, 3), image::ImageFormat::Png),
                "extreme_aspect_ratio", // 1000:1, over the default max_aspect_ratio of 20
            ),
            (9, None, jpeg.clone(), "empty_caption"),
            (10, Some("word ".repeat(300)), jpeg.clone(), "ok"),
            (11, Some("a webp".into()), encode(photo, image::ImageFormat::WebP), "ok"),
        ]
    }

    #[test]
    fn every_bad_row_ends_as_a_counted_logged_rejection() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.parquet");
        let rows = corpus();
        let schema = Arc::new(Schema::new(vec![
            Field::new("hash", DataType::Int64, false),
            Field::new("caption", DataType::Utf8, true),
            Field::new("jpg", DataType::Binary, true),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1.clone()))),
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.2.as_slice()))),
        ];
        let mut writer = AtomicParquetWriter::create(&file, Arc::clone(&schema), &[]).unwrap();
        writer.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
        writer.finish().unwrap();
        let log = dir.path().join("rejects.jsonl");
        let text = format!(
            r#"
[nodes.read]
type = "parquet_source"
path = "{file}"
batch_size = 4
reject_log = "{log}"

[nodes.transform]
type = "image_transform"
inputs = ["read"]
resolution = 64
reject_log = "{log}"

[nodes.tokenize]
type = "tokenize"
inputs = ["transform"]
empty_caption = "reject"
reject_log = "{log}"

[nodes.sink]
type = "probe_sink"
inputs = ["tokenize"]
probe = "bad-input"
"#,
            file = file.display(),
            log = log.display()
        );
        let plan = Plan::from_toml("bad.toml", &text, &[], &catalog()).unwrap();
        let report = run(&plan, &RunOptions { workers: 2, ..RunOptions::default() }).unwrap();
        // Everything expected to pass arrived.
        let mut arrived: Vec<i64> = probe("bad-input").keys.lock().unwrap().values().flatten().copied().collect();
        arrived.sort_unstable();
        let ok: Vec<i64> = rows.iter().filter(|r| r.3 == "ok").map(|r| r.0).collect();
        assert_eq!(arrived, ok);
        // Everything else is counted under its reason, in the profile and the log.
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.3 != "ok") {
            *expected.entry(r.3.to_string()).or_default() += 1;
        }
        let mut counted: BTreeMap<String, u64> = BTreeMap::new();
        for op in &report.profile.operators {
            for (reason, n) in &op.rejected {
                *counted.entry(reason.clone()).or_default() += n;
            }
        }
        assert_eq!(counted, expected);
        let logged: Vec<serde_json::Value> =
            std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(logged.len() as u64, expected.values().sum::<u64>());
        for entry in &logged {
            let key: i64 = entry["key"].as_str().unwrap().parse().unwrap();
            let row = rows.iter().find(|r| r.0 == key).unwrap();
            assert_eq!(entry["reason"], row.3, "{entry}");
        }
        let total: u64 = report.profile.operator("sink").unwrap().items_in + expected.values().sum::<u64>();
        assert_eq!(total, rows.len() as u64, "nothing lost");
    }
}
