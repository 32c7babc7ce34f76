//! The data pipeline: rows to blocks, subsets, local files, the built-in corpus,
//! tokenizers, the token cache.

mod common;

use std::sync::Mutex;

use common::*;
use difflab::data::local::{held_out_rows, LocalDataset};
use difflab::data::prepare::subset;
use difflab::data::tokenizer::{self, Tokenizer};
use difflab::data::{builtin, prepare, Batcher, DataConfig, DataError, Progress, Split, TokenStream};

fn gpt2() -> Tokenizer {
    Tokenizer::from_file("gpt2", &shared_dir().join("data/gpt2-tokenizer/tokenizer.json")).unwrap()
}

fn quiet(_: Progress) {}

#[test]
fn gpt2_tokenizer_encodes_hello_world() {
    let t = gpt2();
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.end_of_text_id(), Some(50256));
}

#[test]
fn rows_become_blocks_as_run_clm_does() {
    // WikiText-shaped rows: a heading, blank rows, body lines with trailing newlines
    let rows: Vec<String> = [
        " = Valkyria Chronicles III = \n",
        "",
        " Senjō no Valkyria 3 is a game . \n",
        "",
        " = = Gameplay = = \n",
        " It is played in turns . \n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = gpt2();
    let ids = t.encode_rows(&rows, "test", &quiet).unwrap();
    // tokenize each row, concatenate: empty rows add nothing, "\n" is token 198
    let mut want = vec![];
    for r in &rows {
        want.extend(t.encode(r).unwrap());
    }
    assert_eq!(ids, want);
    assert_eq!(&ids[..8], &[796, 569, 18354, 7496, 17740, 6711, 796, 220]);
    assert!(ids.contains(&198));
    let stream = TokenStream::from_vec(ids.clone());
    let block_size = 8;
    assert_eq!(stream.num_blocks(block_size), ids.len() / block_size, "the remainder is dropped");
    let batcher = Batcher { stream: &stream, block_size };
    let batch = batcher.batch(&[1, 0], &candle_core::Device::Cpu).unwrap();
    let got: Vec<Vec<u32>> = batch.to_vec2().unwrap();
    assert_eq!(got[0], ids[8..16]);
    assert_eq!(got[1], ids[0..8]);
}

#[test]
fn subset_ratio_keeps_the_first_fraction_of_rows() {
    let rows: Vec<String> = (0..1000).map(|i| format!("row {i}\n")).collect();
    let kept = subset(rows.clone(), 0.01);
    assert_eq!(kept, rows[..10]);
    assert_eq!(subset(rows.clone(), 1.0).len(), 1000);
    assert_eq!(subset(rows, 0.0001).len(), 1, "at least one row");
}

#[test]
fn local_files_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..40).map(|i| format!(" line {i} \n")).collect();
    let txt = dir.path().join("corpus.txt");
    std::fs::write(&txt, rows.concat()).unwrap();
    let jsonl = dir.path().join("corpus.jsonl");
    std::fs::write(&jsonl, rows.iter().map(|r| serde_json::json!({"text": r}).to_string() + "\n").collect::<String>())
        .unwrap();
    let parquet = dir.path().join("corpus.parquet");
    write_parquet(&parquet, &rows);
    for path in [&txt, &jsonl, &parquet] {
        let ds = LocalDataset::resolve(path).unwrap();
        let train = ds.rows(Split::Train).unwrap();
        let valid = ds.rows(Split::Validation).unwrap();
        // the last 5% of rows (2 of 40) are held out, the same every time
        assert_eq!(valid, rows[38..], "{}", path.display());
        assert_eq!(train, rows[..38], "{}", path.display());
        assert_eq!(ds.rows(Split::Validation).unwrap(), valid);
    }
    assert_eq!(held_out_rows(2), 1);
    assert_eq!(held_out_rows(1000), 50);

    let folder = dir.path().join("ds");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("train.txt"), "a\nb\n\nc\n").unwrap();
    std::fs::write(folder.join("validation.txt"), "v\n").unwrap();
    let ds = LocalDataset::resolve(&folder).unwrap();
    assert_eq!(ds.rows(Split::Train).unwrap(), vec!["a\n", "b\n", "", "c\n"]);
    assert_eq!(ds.rows(Split::Validation).unwrap(), vec!["v\n"]);

    let missing = LocalDataset::resolve(&dir.path().join("nope.txt")).unwrap_err();
    assert!(matches!(missing, DataError::NotFound { .. }));
    assert!(missing.to_string().contains("nope.txt"), "{missing}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"txt\": 1}\n{\"text\": \"ok\"}\n").unwrap();
    let err = LocalDataset::resolve(&bad).unwrap().rows(Split::Train).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let empty_folder = dir.path().join("empty");
    std::fs::create_dir(&empty_folder).unwrap();
    assert!(LocalDataset::resolve(&empty_folder).unwrap_err().to_string().contains("train"));
}

#[test]
fn builtin_corpus_is_deterministic_and_large_enough() {
    let a = builtin::generate(5);
    let b = builtin::generate(5);
    assert_eq!(a.train, b.train);
    assert_eq!(a.validation, b.validation);
    let t = gpt2();
    let train_tokens = t.encode_rows(&a.train, "train", &quiet).unwrap().len();
    let valid_tokens = t.encode_rows(&a.validation, "validation", &quiet).unwrap().len();
    assert!(train_tokens >= 1_000_000, "{train_tokens} training tokens");
    assert!(valid_tokens >= 50_000, "{valid_tokens} validation tokens");
    // validation documents are not training documents
    let train_text: std::collections::HashSet<&String> = a.train.iter().filter(|r| r.len() > 80).collect();
    assert!(a.validation.iter().filter(|r| r.len() > 80).all(|r| !train_text.contains(r)));
}

#[test]
fn trained_bpe_round_trips_the_builtin_corpus() {
    let corpus = builtin::generate(difflab::data::BUILTIN_SEED);
    let json = tokenizer::train_bpe(&corpus.train, 2048).unwrap();
    let t = Tokenizer::from_json("bpe:2048", json).unwrap();
    assert_eq!(t.vocab_size(), 2048);
    for split in [&corpus.train, &corpus.validation] {
        let text = split.concat();
        let ids = t.encode(&text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert!(ids.len() < text.len() / 2, "BPE compresses: {} ids for {} bytes", ids.len(), text.len());
    }
}

#[test]
fn byte_tokenizer_is_one_id_per_byte() {
    let dir = tempfile::tempdir().unwrap();
    let t = tokenizer::load(&difflab::data::TokenizerSpec::Byte, dir.path(), "x", &mut || Ok(vec![]), &quiet).unwrap();
    let text = "Héllo = wörld =\n";
    assert_eq!(t.encode(text).unwrap(), text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
    assert_eq!(t.vocab_size(), 257);
}

#[test]
fn second_preparation_reads_the_cache_and_corrupt_files_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("c.txt");
    std::fs::write(&txt, (0..500).map(|i| format!(" sentence number {i} is here .\n")).collect::<String>()).unwrap();
    let cfg = DataConfig {
        dataset: txt.to_string_lossy().into_owned(),
        dataset_config: String::new(),
        subset_ratio: 1.0,
        tokenizer: difflab::data::TokenizerSpec::Bpe(300),
        eval_split: difflab::data::Split::Validation,
        cache_dir: dir.path().join("cache"),
    };
    let events = Mutex::new(vec![]);
    let record = |p: Progress| events.lock().unwrap().push(p.stage);
    let first = prepare(&cfg, &record).unwrap();
    assert!(events.lock().unwrap().iter().any(|s| s.starts_with("tokenizing train")));
    assert!(events.lock().unwrap().iter().any(|s| s.starts_with("training a byte-level BPE")));
    events.lock().unwrap().clear();
    let second = prepare(&cfg, &record).unwrap();
    assert!(
        !events.lock().unwrap().iter().any(|s| s.starts_with("tokenizing") || s.starts_with("training")),
        "{:?}",
        events.lock().unwrap()
    );
    assert!(second.notes.iter().all(|n| n.contains("from the cache")), "{:?}", second.notes);
    let (train_ids, valid_ids) = (first.train.to_vec(), first.validation.to_vec());
    assert!(second.train.to_vec() == train_ids && second.validation.to_vec() == valid_ids);
    // the streams map the cache files: release them before damaging the files
    drop((first, second));

    // truncate every token file: detected and rebuilt, with the same content
    for e in std::fs::read_dir(dir.path().join("cache/tokens")).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    }
    let third = prepare(&cfg, &quiet).unwrap();
    assert!(third.notes.iter().any(|n| n.contains("corrupt")), "{:?}", third.notes);
    assert!(third.train.to_vec() == train_ids, "rebuilt tokens equal the originals");

    // a different subset is a different cache entry
    let half = prepare(&DataConfig { subset_ratio: 0.5, ..cfg.clone() }, &quiet).unwrap();
    assert!(half.train.len() < train_ids.len());
}
