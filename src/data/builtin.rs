//! The built-in corpus: English-like stories the project generates itself, deterministically,
//! so the demo and the tests run offline with text that has something to learn at every range.
//!
//! - short range: fixed word order, articles, prepositions, punctuation;
//! - medium range: subject–verb agreement across relative clauses ("the goats that the miller
//!   feeds *are* ..."), pronoun gender, bracket nesting;
//! - long range: each document introduces people with a trade, a home town, a number and an
//!   object, and recalls those facts paragraphs later (and in a closing question and answer).
//!
//! Rows are shaped like WikiText's: a ` = Title = ` heading row, blank rows, and paragraph
//! rows that start with a space and end in `\n`. No third-party text is involved.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SYLLABLES_A: &[&str] = &[
    "Tam", "Or", "Cor", "Ed", "Mar", "Bel", "Ros", "Al", "Wen", "Hal", "Is", "Jor", "Kel", "Lin", "Mir", "Nor", "Per",
    "Quen", "Ran", "Sel", "Tor", "Ul", "Ves", "Wyn", "Yar", "Zel", "Bran", "Cal", "Dar", "Fen",
];
const SYLLABLES_B: &[&str] = &[
    "sin", "rin", "win", "da", "ek", "la", "ric", "en", "dy", "ford", "olde", "an", "wen", "ia", "o", "ett", "is",
    "ra", "mund", "el", "ith", "ar", "ny", "ius", "ette", "wyn",
];
const TOWN_A: &[&str] = &[
    "Dun", "Hal", "Ash", "Brack", "Cold", "Elm", "Fern", "Glen", "High", "Iron", "Kings", "Long", "Mill", "North",
    "Oak", "Pike", "Red", "Stone", "Thorn", "West", "Wick", "Black", "Marrow", "Silver",
];
const TOWN_B: &[&str] =
    &["more", "den", "by", "ford", "ton", "wick", "field", "brook", "hollow", "gate", "mere", "stead", "haven", "moor"];

/// (trade, workplace)
const TRADES: &[(&str, &str)] = &[
    ("weaver", "loom house"),
    ("miller", "mill"),
    ("smith", "forge"),
    ("baker", "bakehouse"),
    ("potter", "kiln"),
    ("fisher", "harbour"),
    ("carpenter", "workshop"),
    ("mason", "quarry"),
    ("tanner", "tannery"),
    ("brewer", "brewhouse"),
    ("shepherd", "high pasture"),
    ("cooper", "cooperage"),
    ("scribe", "library"),
    ("healer", "infirmary"),
    ("ferryman", "river crossing"),
    ("glassblower", "glass works"),
    ("beekeeper", "apiary"),
    ("cartwright", "wheel yard"),
    ("dyer", "dye works"),
    ("chandler", "candle shop"),
];
/// (singular, plural)
const ANIMALS: &[(&str, &str)] = &[
    ("goat", "goats"),
    ("sheep", "sheep"),
    ("hen", "hens"),
    ("horse", "horses"),
    ("dog", "dogs"),
    ("cat", "cats"),
    ("goose", "geese"),
    ("cow", "cows"),
    ("pig", "pigs"),
    ("duck", "ducks"),
    ("mule", "mules"),
    ("ox", "oxen"),
];
const OBJECTS: &[&str] = &[
    "lantern", "cloak", "ring", "knife", "drum", "map", "bell", "compass", "kettle", "flute", "book", "key", "shield",
    "basket",
];
const COLORS: &[&str] =
    &["grey", "red", "green", "blue", "black", "white", "golden", "brown", "silver", "yellow", "copper", "violet"];
const NUMBERS: &[&str] = &["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];
/// (singular, plural) common nouns for the middle of a story
const NOUNS: &[(&str, &str)] = &[
    ("traveller", "travellers"),
    ("child", "children"),
    ("merchant", "merchants"),
    ("neighbour", "neighbours"),
    ("soldier", "soldiers"),
    ("farmer", "farmers"),
    ("stranger", "strangers"),
    ("sister", "sisters"),
    ("guard", "guards"),
    ("singer", "singers"),
    ("elder", "elders"),
    ("apprentice", "apprentices"),
];
/// (3rd singular present, plural present, past) transitive verbs
const VERBS: &[(&str, &str, &str)] = &[
    ("sees", "see", "saw"),
    ("helps", "help", "helped"),
    ("follows", "follow", "followed"),
    ("admires", "admire", "admired"),
    ("visits", "visit", "visited"),
    ("calls", "call", "called"),
    ("trusts", "trust", "trusted"),
    ("teaches", "teach", "taught"),
    ("greets", "greet", "greeted"),
    ("thanks", "thank", "thanked"),
    ("watches", "watch", "watched"),
    ("feeds", "feed", "fed"),
];
/// (singular, plural) predicates with agreement
const PREDICATES: &[(&str, &str)] = &[
    ("is tired", "are tired"),
    ("was happy", "were happy"),
    ("walks to the market", "walk to the market"),
    ("has a cart", "have a cart"),
    ("sings at night", "sing at night"),
    ("was late", "were late"),
    ("lives by the river", "live by the river"),
    ("does not know the way", "do not know the way"),
    ("is waiting at the gate", "are waiting at the gate"),
    ("has gone home", "have gone home"),
];
const PLACES: &[&str] = &[
    "the market",
    "the bridge",
    "the well",
    "the old road",
    "the square",
    "the orchard",
    "the chapel",
    "the harbour",
    "the hill",
    "the inn",
];
const WEATHER: &[&str] = &["rain", "snow", "wind", "fog", "sun", "frost"];
const SEASONS: &[&str] = &["spring", "summer", "autumn", "winter"];

struct Person {
    name: String,
    family: String,
    she: bool,
    trade: usize,
    town: String,
    count: usize,
    animal: usize,
    color: &'static str,
    object: &'static str,
}

impl Person {
    fn subj(&self) -> &'static str {
        if self.she {
            "she"
        } else {
            "he"
        }
    }
    fn poss(&self) -> &'static str {
        if self.she {
            "her"
        } else {
            "his"
        }
    }
    fn obj(&self) -> &'static str {
        if self.she {
            "her"
        } else {
            "him"
        }
    }
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    // the lists above are never empty
    xs.choose(rng).unwrap_or(&xs[0])
}

fn name(rng: &mut ChaCha8Rng) -> String {
    format!("{}{}", pick(rng, SYLLABLES_A), pick(rng, SYLLABLES_B))
}

fn town(rng: &mut ChaCha8Rng) -> String {
    format!("{}{}", pick(rng, TOWN_A), pick(rng, TOWN_B))
}

fn person(rng: &mut ChaCha8Rng, town_name: String) -> Person {
    Person {
        name: name(rng),
        family: format!(
            "{}{}",
            pick(rng, SYLLABLES_A),
            pick(rng, &["wood", "stone", "brook", "well", "ridge", "field"])
        ),
        she: rng.random_bool(0.5),
        trade: rng.random_range(0..TRADES.len()),
        town: town_name,
        count: rng.random_range(0..NUMBERS.len()),
        animal: rng.random_range(0..ANIMALS.len()),
        color: pick::<&str>(rng, COLORS),
        object: pick::<&str>(rng, OBJECTS),
    }
}

/// A noun phrase and whether it is plural, optionally with a (possibly nested) relative clause.
fn noun_phrase(rng: &mut ChaCha8Rng, people: &[Person], depth: usize) -> (String, bool) {
    let plural = rng.random_bool(0.5);
    let (sg, pl) = *pick(rng, NOUNS);
    let mut np = format!("the {}", if plural { pl } else { sg });
    if depth > 0 && rng.random_bool(0.45) {
        // "the children that the miller feeds": the inner verb agrees with the inner subject
        let (inner, inner_plural) = if rng.random_bool(0.5) {
            let p = pick(rng, people);
            (format!("{} the {}", p.name, TRADES[p.trade].0), false)
        } else {
            noun_phrase(rng, people, depth - 1)
        };
        let (v3, vp, _) = *pick(rng, VERBS);
        np = format!("{np} that {inner} {}", if inner_plural { vp } else { v3 });
    }
    (np, plural)
}

fn agreement_sentence(rng: &mut ChaCha8Rng, people: &[Person]) -> String {
    let (np, plural) = noun_phrase(rng, people, 2);
    let (sg, pl) = *pick(rng, PREDICATES);
    let mut s = format!("{} {}", cap(&np), if plural { pl } else { sg });
    if rng.random_bool(0.25) {
        // bracket nesting, closed in order
        let p = pick(rng, people);
        s = format!("{s} ( as {} the {} said ( twice ) )", p.name, TRADES[p.trade].0);
    }
    s + " ."
}

fn story_sentence(rng: &mut ChaCha8Rng, people: &[Person]) -> String {
    let p = pick(rng, people);
    let (_, _, past) = *pick(rng, VERBS);
    match rng.random_range(0..6) {
        0 => format!(
            "In the {} {} , {} {} went to {} .",
            pick(rng, &["early", "late"]),
            pick(rng, SEASONS),
            p.name,
            p.family,
            pick(rng, PLACES)
        ),
        1 => {
            let q = pick(rng, people);
            format!(
                "{} {} {} at {} , and {} {} {} back .",
                p.name,
                past,
                q.name,
                pick(rng, PLACES),
                q.subj(),
                past,
                p.obj()
            )
        }
        2 => format!(
            "There was {} in {} that day , so {} stayed at the {} .",
            pick(rng, WEATHER),
            p.town,
            p.subj(),
            TRADES[p.trade].1
        ),
        3 => format!("{} said that {} {} needed a new {} .", p.name, p.poss(), ANIMALS[p.animal].1, pick(rng, OBJECTS)),
        4 => format!("{} worked at the {} from morning until night .", p.name, TRADES[p.trade].1),
        _ => agreement_sentence(rng, people),
    }
}

/// One article: heading, introduction (the facts), story paragraphs, recall, questions.
pub fn document(seed: u64, index: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    let home = town(&mut rng);
    let n_people = rng.random_range(2..=4);
    let people: Vec<Person> = (0..n_people)
        .map(|i| {
            let t = if i == 0 || rng.random_bool(0.5) { home.clone() } else { town(&mut rng) };
            person(&mut rng, t)
        })
        .collect();
    let hero = &people[0];
    let mut rows = vec![format!(" = The {} of {} = \n", cap(TRADES[hero.trade].0), hero.town), String::new()];

    let mut intro = vec![];
    for p in &people {
        let (trade, _) = TRADES[p.trade];
        intro.push(format!("{} {} was a {trade} who lived in {} .", p.name, p.family, p.town));
        intro.push(format!(
            "{} kept {} {} and a {} {} .",
            cap(p.subj()),
            NUMBERS[p.count],
            ANIMALS[p.animal].1,
            p.color,
            p.object
        ));
    }
    rows.push(format!(" {} \n", intro.join(" ")));
    rows.push(String::new());

    for _ in 0..rng.random_range(2..=4) {
        if rng.random_bool(0.3) {
            rows.push(format!(" = = {} = = \n", cap(pick::<&str>(&mut rng, SEASONS))));
            rows.push(String::new());
        }
        let sentences: Vec<String> = (0..rng.random_range(3..=6)).map(|_| story_sentence(&mut rng, &people)).collect();
        rows.push(format!(" {} \n", sentences.join(" ")));
        rows.push(String::new());
    }

    // long range: recall the introduced facts
    let mut recall = vec![];
    for p in &people {
        let (trade, place) = TRADES[p.trade];
        match rng.random_range(0..3) {
            0 => recall.push(format!("Years later , {} the {trade} still lived in {} .", p.name, p.town)),
            1 => recall.push(format!(
                "{} never lost the {} {} , and {} {} {} were well .",
                p.name,
                p.color,
                p.object,
                p.poss(),
                NUMBERS[p.count],
                ANIMALS[p.animal].1
            )),
            _ => recall.push(format!(
                "Every {} , {} went back to the {} in {} .",
                pick(&mut rng, SEASONS),
                p.name,
                place,
                p.town
            )),
        }
    }
    rows.push(format!(" {} \n", recall.join(" ")));
    rows.push(String::new());
    let q = pick(&mut rng, &people);
    let qa = match rng.random_range(0..3) {
        0 => format!("Where did {} live ? {} lived in {} .", q.name, q.name, q.town),
        1 => format!("What was {} 's trade ? {} was a {} .", q.name, cap(q.subj()), TRADES[q.trade].0),
        _ => format!(
            "What did {} keep ? {} kept {} {} and a {} {} .",
            q.name,
            cap(q.subj()),
            NUMBERS[q.count],
            ANIMALS[q.animal].1,
            q.color,
            q.object
        ),
    };
    rows.push(format!(" {qa} \n"));
    rows.push(String::new());
    rows
}

/// The corpus splits as rows. Training documents use indices from 0, validation documents a
/// disjoint range, so validation names and facts are unseen.
pub struct Corpus {
    pub train: Vec<String>,
    pub validation: Vec<String>,
}

/// Words of training text to generate: ~1.3M tokens with a small BPE, ~1.6M words.
pub const TRAIN_WORDS: usize = 1_600_000;
pub const VALIDATION_WORDS: usize = 80_000;
const VALIDATION_OFFSET: u64 = 1 << 40;

pub fn generate(seed: u64) -> Corpus {
    let rows_until = |words: usize, offset: u64| {
        let mut rows = vec![];
        let mut count = 0;
        let mut i = 0;
        while count < words {
            for row in document(seed, offset + i) {
                count += row.split_whitespace().count();
                rows.push(row);
            }
            i += 1;
        }
        rows
    };
    Corpus { train: rows_until(TRAIN_WORDS, 0), validation: rows_until(VALIDATION_WORDS, VALIDATION_OFFSET) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a: String = (0..50).flat_map(|i| document(1, i)).collect();
        let b: String = (0..50).flat_map(|i| document(1, i)).collect();
        let c: String = (0..50).flat_map(|i| document(2, i)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn documents_recall_the_facts_they_introduce() {
        for i in 0..20 {
            let doc = document(7, i);
            assert!(doc[0].starts_with(" = ") && doc[0].ends_with(" = \n"), "heading row: {:?}", doc[0]);
            let intro = &doc[2];
            let last = doc.iter().rev().find(|r| !r.is_empty()).unwrap();
            // the question names someone introduced at the top, and the answer repeats a fact from there
            let asked = last.split_whitespace().nth(2).unwrap();
            assert!(intro.contains(asked), "{asked} introduced in {intro}");
        }
    }

    #[test]
    fn verbs_agree_with_their_subjects() {
        let text: String = (0..200).flat_map(|i| document(3, i)).collect();
        for bad in ["children is", "travellers was", "soldier are", "farmer were", "guards has"] {
            assert!(!text.contains(&format!("the {bad}")), "agreement error: {bad}");
        }
        assert!(text.contains(" that "), "relative clauses present");
    }
}
