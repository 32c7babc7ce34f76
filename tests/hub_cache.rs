//! WikiText and the GPT-2 tokenizer through a Hugging Face cache laid out exactly like the real
//! one, with the network unreachable. One test per binary: it sets process environment.

mod common;

use common::*;
use difflab::data::tokenizer::GPT2_REVISION;
use difflab::data::{prepare, wikitext, DataConfig, DataError, Progress, Split};

#[test]
fn wikitext_loads_from_a_real_layout_cache_with_no_network() {
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    // a closed loopback port: any request would fail
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_HUB_OFFLINE");

    // nothing cached yet: offline, the error names the repo, the file and how to fetch it
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let cfg = DataConfig {
        dataset: "wikitext".into(),
        dataset_config: "wikitext-2-raw-v1".into(),
        subset_ratio: 1.0,
        tokenizer: difflab::data::TokenizerSpec::Gpt2,
        eval_split: difflab::data::Split::Validation,
        cache_dir: home.path().join("difflab"),
    };
    let err = prepare(&cfg, &|_| {}).err().expect("empty cache offline fails");
    let msg = err.to_string();
    // every missing file at once: the tokenizer, the train and the validation split, with one
    // `hf download` per repository (and the older CLI's spelling)
    assert!(matches!(err, DataError::HubMissingMany { count: 3, .. }), "{msg}");
    assert!(
        msg.contains("openai-community/gpt2: `tokenizer.json`")
            && msg.contains("wikitext-2-raw-v1/train-00000-of-00001.parquet")
            && msg.contains("wikitext-2-raw-v1/validation-00000-of-00001.parquet")
            && msg.contains(&format!("`hf download openai-community/gpt2 tokenizer.json --revision {GPT2_REVISION}`"))
            && msg.contains("`hf download Salesforce/wikitext --repo-type dataset wikitext-2-raw-v1/train-00000-of-00001.parquet wikitext-2-raw-v1/validation-00000-of-00001.parquet")
            && msg.contains("huggingface-cli download"),
        "{msg}"
    );

    // the GPT-2 tokenizer, then WikiText rows with a heading and blank rows
    let tokenizer_json = std::fs::read(shared_dir().join("data/gpt2-tokenizer/tokenizer.json")).unwrap();
    // at the pinned commit, as `hf download --revision` (or a download of `main` today) leaves it
    fake_hub_repo(&hub, "models--openai-community--gpt2", GPT2_REVISION, &[("tokenizer.json", tokenizer_json)]);
    let err = prepare(&cfg, &|_| {}).err().expect("dataset still missing");
    assert!(
        err.to_string().contains("Salesforce/wikitext")
            && err.to_string().contains("wikitext-2-raw-v1/train-00000-of-00001.parquet"),
        "{err}"
    );

    let train: Vec<String> = (0..300)
        .flat_map(|i| {
            [format!(" = Article {i} = \n"), String::new(), format!(" Body of article {i} , with words . \n")]
        })
        .collect();
    let valid: Vec<String> = vec![" = Valid = \n".into(), String::new(), " held out text . \n".into()];
    let dir = tempfile::tempdir().unwrap();
    let (tp, vp) = (dir.path().join("t.parquet"), dir.path().join("v.parquet"));
    write_parquet(&tp, &train);
    write_parquet(&vp, &valid);
    let files = wikitext::files("wikitext-2-raw-v1", Split::Train)
        .into_iter()
        .chain(wikitext::files("wikitext-2-raw-v1", Split::Validation));
    let named: Vec<(String, Vec<u8>)> = files
        .map(|f| {
            let bytes = std::fs::read(if f.filename.contains("train") { &tp } else { &vp }).unwrap();
            (f.filename, bytes)
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = named.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    fake_hub_repo(&hub, "datasets--Salesforce--wikitext", wikitext::REVISION, &refs);

    for offline in ["1", "0"] {
        // offline reads the cache; online with an unreachable endpoint reads it too
        std::env::set_var("HF_HUB_OFFLINE", offline);
        let seen = std::sync::Mutex::new(vec![]);
        let data = prepare(&cfg, &|p: Progress| seen.lock().unwrap().push(p.stage)).unwrap();
        let want: Vec<u32> = train.iter().flat_map(|r| data.tokenizer.encode(r).unwrap()).collect();
        assert!(data.train.to_vec() == want, "train tokens");
        assert!(data.validation.to_vec() == data.tokenizer.encode(&valid.concat()).unwrap(), "validation tokens");
    }
    // subset_ratio through the whole path
    let small = prepare(&DataConfig { subset_ratio: 0.1, ..cfg.clone() }, &|_| {}).unwrap();
    let want: Vec<u32> = train[..90].iter().flat_map(|r| small.tokenizer.encode(r).unwrap()).collect();
    assert!(small.train.to_vec() == want, "subset tokens");
    // the test split is its own file: asked for and missing offline, it is named
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = prepare(&DataConfig { eval_split: Split::Test, ..cfg.clone() }, &|_| {}).err().expect("no test file");
    assert!(err.to_string().contains("wikitext-2-raw-v1/test-00000-of-00001.parquet"), "{err}");
}
