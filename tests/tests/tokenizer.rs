//! The CLIP tokenizer against the reference goldens: every case of `clip_tokens.json` in both
//! references' clean-up, and the pipeline tokenizer's ids in `golden.safetensors`.

use latentflow_operators::clip::{Cleanup, ClipTokenizer, Padding, Vocab};
use latentflow_tests::{fixture, golden_i64};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(fixture("clip_tokens.json")).unwrap()).unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn ids(value: &Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn openai_reference_cases_all_match() {
    // The bundled OpenAI vocabulary with OpenAI's clean-up reproduces `SimpleTokenizer`.
    let tok = ClipTokenizer::new(Vocab::bundled().unwrap(), Cleanup::OpenAi).unwrap();
    let cases = cases();
    assert_eq!(cases.len(), 85);
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let simple: Vec<i64> = tok.encode(text).into_iter().map(i64::from).collect();
        assert_eq!(simple, ids(&case["simple_ids"]), "simple_ids of {text:?}");
        assert_eq!(tok.input_ids(text, Padding::Sd1, 77).0, ids(&case["sd1_input_ids"]), "sd1 of {text:?}");
        assert_eq!(tok.input_ids(text, Padding::Sd2, 77).0, ids(&case["sd2_openclip_input_ids"]), "sd2 of {text:?}");
    }
}

#[test]
fn hugging_face_folder_cases_all_match() {
    // The tokenizer folder with Hugging Face's clean-up: `tokenizer_json_input_ids` where Hugging
    // Face differs from OpenAI (HTML entities, ftfy's fixes), `sd1_input_ids` elsewhere.
    let mut vocab = Vocab::from_folder(&fixture("tiny-sd/tokenizer")).unwrap();
    vocab.config.pad_token = Some("<|endoftext|>".into());
    let tok = ClipTokenizer::new(vocab, Cleanup::HuggingFace).unwrap();
    let mut differing = 0;
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        let expected = match case.get("tokenizer_json_input_ids") {
            Some(v) => {
                differing += 1;
                ids(v)
            }
            None => ids(&case["sd1_input_ids"]),
        };
        assert_eq!(tok.input_ids(text, Padding::Sd1, 77).0, expected, "{text:?}");
    }
    assert_eq!(differing, 4);
}

#[test]
fn the_pipeline_tokenizer_gives_the_golden_ids_with_both_paddings() {
    // The fixture's tokenizer folder pads with `!` (SD2) and, like Hugging Face, turns every `!`
    // in a caption into id 0.
    let captions = [
        "a photo of an astronaut in a white spacesuit next to a flag",
        "A TABBY Cat, 3 years old; sitting by the window!! (photo #2)",
        "a black and white photograph of a man standing on a grassy hill behind an old camera on a wooden tripod, wearing a long dark coat and gloves, with a row of tall buildings, a clock tower, a wide river, several small boats, a stone bridge, bare winter trees, a cloudy sky and a flock of birds far away in the background, shot on film with a wide angle lens, soft natural light, high contrast, fine grain, sharp focus, award winning composition, museum archive scan, 1950s street photography style",
        "",
    ];
    let sd2 =
        ClipTokenizer::new(Vocab::from_folder(&fixture("tiny-sd/tokenizer")).unwrap(), Cleanup::HuggingFace).unwrap();
    let (shape, golden) = golden_i64("input_ids");
    assert_eq!(shape, [4, 77]);
    for (i, caption) in captions.iter().enumerate() {
        assert_eq!(sd2.input_ids(caption, Padding::Sd2, 77).0, golden[i * 77..(i + 1) * 77], "caption {i}");
    }
    let mut vocab = Vocab::from_folder(&fixture("tiny-sd/tokenizer")).unwrap();
    vocab.config.pad_token = Some("<|endoftext|>".into());
    let sd1 = ClipTokenizer::new(vocab, Cleanup::HuggingFace).unwrap();
    let (_, golden) = golden_i64("input_ids_sd1");
    for (i, caption) in captions.iter().enumerate() {
        let (ids, truncated) = sd1.input_ids(caption, Padding::Sd1, 77);
        assert_eq!(ids, golden[i * 77..(i + 1) * 77], "caption {i}");
        assert_eq!(truncated, i == 2, "only the long caption is truncated");
    }
}

#[test]
fn hugging_face_sd2_padding_follows_open_clip_except_for_bangs() {
    let tok =
        ClipTokenizer::new(Vocab::from_folder(&fixture("tiny-sd/tokenizer")).unwrap(), Cleanup::HuggingFace).unwrap();
    for case in cases().iter().filter(|c| c.get("tokenizer_json_input_ids").is_none()) {
        let text = case["text"].as_str().unwrap();
        let ids_out = tok.input_ids(text, Padding::Sd2, 77).0;
        if text.contains('!') {
            // Each `!` is the pad token (id 0) to Hugging Face; the rest tokenizes as usual.
            assert_eq!(&ids_out[..4], &[49406, 0, 0, 0], "{text:?}");
            let rest: Vec<i64> = tok.encode("???...,,,;;;").into_iter().map(i64::from).collect();
            assert_eq!(&ids_out[4..4 + rest.len()], &rest[..]);
        } else {
            assert_eq!(ids_out, ids(&case["sd2_openclip_input_ids"]), "{text:?}");
        }
    }
}
