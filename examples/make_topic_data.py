"""Regenerate the labelled classification demo data shipped in examples/data/ (deterministic).

    python examples/make_topic_data.py

topics-{train,eval}.jsonl -- news-style sentences labelled with one of four topics
    (sports, business, science, health); rows are {"text": ..., "label": ...}.
    Sentences are assembled from hand-written templates and phrase lists in this file (made up
    here; no third-party text, so no licence beyond the project's own). The held-out eval split
    uses phrase lists and frames that never occur in the train split, so a model only does well
    on it if it carries meaning over from pre-training, not by memorising phrases. The train split
    is imbalanced on purpose (40/30/20/10 %), which is what task.class_weights is for; the eval
    split is balanced.
ner-{train,eval}.jsonl -- word-level named-entity tags in the CoNLL-2003 IOB2 style (PER, ORG,
    LOC); rows are {"tokens": [...], "tags": [...]}, from templates and name lists in this file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = ["sports", "business", "science", "health"]
TRAIN_SHARE = {"sports": 0.4, "business": 0.3, "science": 0.2, "health": 0.1}

# topic -> split -> (subjects, predicates). Train and eval lists are disjoint.
PHRASES = {
    "sports": {
        "train": (["the home team", "the striker", "the goalkeeper", "the veteran coach", "the defending champion",
                   "the young sprinter", "the tennis star", "the rugby squad", "the visiting side", "the captain"],
                  ["won the final after extra time", "scored twice in the second half",
                   "was injured during the warm-up", "signed a new contract with the club",
                   "broke the national record in the relay", "lost the match on penalties",
                   "qualified for the world cup", "was sent off for a foul", "finished third in the marathon",
                   "celebrated the league title with fans"]),
        "eval": (["the underdog club", "the cycling team", "the boxer", "the basketball guard", "the olympic swimmer",
                  "the cricket captain", "the hockey goalie"],
                 ["clinched the championship in overtime", "hit a home run in the ninth inning",
                  "knocked out the title holder", "set a personal best in the freestyle",
                  "was transferred to a rival team", "missed the tournament with a knee injury",
                  "took the yellow jersey on the mountain stage"]),
    },
    "business": {
        "train": (["the bank", "the retailer", "the car maker", "the airline", "the software company",
                   "the central bank", "shareholders", "the chief executive", "the energy firm", "investors"],
                  ["reported record quarterly profits", "cut hundreds of jobs to reduce costs",
                   "announced a merger with a rival", "raised interest rates by half a point",
                   "saw its shares fall sharply", "opened two hundred new stores", "issued a profit warning",
                   "agreed to buy a startup for two billion dollars", "lowered its sales forecast",
                   "paid a larger dividend than expected"]),
        "eval": (["the telecom operator", "the hedge fund", "the mining group", "the supermarket chain",
                  "the stock exchange", "the insurer", "the shipping giant"],
                 ["posted a quarterly loss as revenue slumped", "filed for bankruptcy protection",
                  "launched an initial public offering", "was fined by the competition regulator",
                  "outsourced its call centres to cut expenses", "beat analyst earnings estimates",
                  "renegotiated its debt with creditors"]),
    },
    "science": {
        "train": (["astronomers", "the research team", "physicists", "the space agency", "biologists",
                   "the laboratory", "chemists", "geologists", "the telescope", "the probe"],
                  ["discovered a new planet orbiting a distant star", "measured the mass of the particle",
                   "published a study on ancient fossils", "launched a satellite into orbit",
                   "observed a rare supernova", "sequenced the genome of a rare frog",
                   "found water ice beneath the surface of mars", "built a more precise atomic clock",
                   "mapped the ocean floor with sonar", "detected gravitational waves from a collision"]),
        "eval": (["the rover", "palaeontologists", "the particle collider", "oceanographers", "the observatory",
                  "quantum researchers", "the climate scientists"],
                 ["photographed a comet passing the sun", "identified a new species of dinosaur",
                  "recorded a collision of heavy ions", "charted deep sea currents",
                  "entangled photons across a city", "analysed ice cores from antarctica",
                  "spotted a black hole swallowing a star"]),
    },
    "health": {
        "train": (["doctors", "the hospital", "nurses", "the health ministry", "the vaccine maker", "patients",
                   "the clinic", "surgeons", "the medical board", "public health officials"],
                  ["warned about a rise in flu cases", "approved a new treatment for diabetes",
                   "reported shorter waiting times for surgery", "recommended more exercise and less sugar",
                   "tested a vaccine in a large clinical trial", "performed the first heart transplant of the year",
                   "urged parents to vaccinate their children", "linked poor sleep to heart disease",
                   "opened a new cancer ward", "found that the drug lowers blood pressure"]),
        "eval": (["paediatricians", "the dental association", "the pharmacy chain", "epidemiologists",
                  "the mental health charity", "the emergency room"],
                 ["reported an outbreak of measles", "prescribed antibiotics less often",
                  "advised people to wear sunscreen", "treated dozens of patients for food poisoning",
                  "published guidance on childhood asthma", "recommended a booster dose for the elderly",
                  "called for more screening for depression"]),
    },
}
FRAMES = {"train": ["{s} {p}.", "Yesterday {s} {p}.", "Reports say {s} {p}.", "On Monday {s} {p}.",
                    "In a surprise, {s} {p}.", "It emerged that {s} {p}."],
          "eval": ["{s} {p}, officials confirmed.", "Late on Friday {s} {p}.", "According to a statement, {s} {p}.",
                   "Breaking: {s} {p}."]}


def topic_rows(split: str, counts: dict[str, int], rng: random.Random) -> list[dict]:
    rows = []
    for topic in TOPICS:
        subjects, predicates = PHRASES[topic][split]
        for _ in range(counts[topic]):
            s, p, frame = rng.choice(subjects), rng.choice(predicates), rng.choice(FRAMES[split])
            text = frame.format(s=s, p=p)
            rows.append({"text": text[0].upper() + text[1:], "label": topic})
    rng.shuffle(rows)
    return rows


NAMES = {"train": {"PER": [["Maria", "Lopez"], ["John"], ["Anna", "Berg"], ["Wei", "Zhang"], ["Peter", "Olsen"]],
                   "ORG": [["Acme", "Corp"], ["the", "United", "Nations"], ["Globex"], ["Red", "Cross"]],
                   "LOC": [["Paris"], ["New", "York"], ["Lagos"], ["the", "Alps"], ["Buenos", "Aires"]]},
         "eval": {"PER": [["Kofi", "Mensah"], ["Elena"], ["Raj", "Patel"]],
                  "ORG": [["Initech"], ["World", "Health", "Organization"]],
                  "LOC": [["Oslo"], ["Rio", "de", "Janeiro"], ["Kyoto"]]}}
NER_TEMPLATES = ["{PER} works for {ORG} in {LOC} .", "{PER} flew to {LOC} on Tuesday .",
                 "{ORG} opened an office in {LOC} .", "{PER} met {PER} at {ORG} .",
                 "Yesterday {PER} left {ORG} .", "{LOC} welcomed {PER} ."]


def ner_rows(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for piece in rng.choice(NER_TEMPLATES).split(" "):
            if piece.startswith("{"):
                kind = piece[1:-1]
                words = list(rng.choice(NAMES[split][kind]))
                if words[0] == "the":  # CoNLL-2003 leaves the article outside the entity
                    tokens.append(words.pop(0))
                    tags.append("O")
                tokens += words
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
            else:
                tokens.append(piece)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    n_train = 800
    train_counts = {t: round(n_train * share) for t, share in TRAIN_SHARE.items()}
    write_jsonl(data / "topics-train.jsonl", topic_rows("train", train_counts, random.Random(11)))
    write_jsonl(data / "topics-eval.jsonl", topic_rows("eval", {t: 50 for t in TOPICS}, random.Random(12)))
    write_jsonl(data / "ner-train.jsonl", ner_rows("train", 400, random.Random(13)))
    write_jsonl(data / "ner-eval.jsonl", ner_rows("eval", 100, random.Random(14)))
    print(f"wrote topics-*.jsonl and ner-*.jsonl to {data}")


if __name__ == "__main__":
    main()
