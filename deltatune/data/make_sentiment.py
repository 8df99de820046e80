"""Write ``sentiment_train.tsv`` and ``sentiment_dev.tsv``: the small review set of the embedded default job.

Every phrase below was written for deltatune (no sentence comes from an existing dataset). Sentences are
composed from hand-written pieces with a fixed seed, so running this script again gives the same files:

    python deltatune/data/make_sentiment.py

A share of the predicates, openers and subjects is kept out of training and used only in the dev set, so
dev accuracy measures more than recall of seen phrases. Labels: 1 = positive, 0 = negative.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SEED = 20240611
N_TRAIN, N_DEV = 800, 240
HERE = Path(__file__).resolve().parent

# Subjects are singular (the predicates say "is"/"was"); predicates are general or fit one domain only.
MOVIE_SUBJECTS = [
    "the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the script", "the cast",
    "the dialogue", "the cinematography", "the lead actor", "the sequel", "this documentary", "the pacing",
    "the director's new picture", "the second half", "the opening scene", "the villain", "this comedy",
    "the animation", "the story", "the final act", "this thriller", "the remake",
]
PRODUCT_SUBJECTS = [
    "the battery", "this blender", "the screen", "the build quality", "customer support", "the keyboard",
    "this headset", "the charger", "this jacket", "the delivery", "the camera", "the vacuum cleaner",
    "the coffee maker", "this phone case", "the mattress", "the app", "the sound quality", "the zipper",
    "this backpack", "the instruction manual", "the kettle", "this pair of running shoes", "the desk lamp",
    "the printer",
]
GENERAL_POSITIVE = [
    "was wonderful", "is a real delight", "exceeded my expectations", "was beautifully done", "is excellent",
    "was a pleasant surprise", "is top notch", "is brilliant", "was superb", "left me impressed", "is first rate",
    "was lovely", "was a triumph", "is outstanding", "won me over", "was delightful", "is simply great",
    "was a treat", "is fantastic",
]
GENERAL_NEGATIVE = [
    "was a huge letdown", "was awful", "is a disappointment", "was a mess", "was terrible", "is frustrating",
    "is a total failure", "was annoying", "is horrible", "let me down", "was dreadful", "was a disaster",
    "is mediocre at best", "was really bad", "is pathetic", "was a big mistake", "is poor",
]
MOVIE_POSITIVE = [
    "felt fresh and clever", "kept me hooked", "was an absolute joy", "was surprisingly moving", "made me smile",
    "was charming from start to finish", "felt warm and honest", "was great fun", "was gripping",
    "was genuinely funny", "was thoughtful and smart", "had me on the edge of my seat",
]
MOVIE_NEGATIVE = [
    "was a complete waste of time", "felt dull and lifeless", "made no sense at all", "was boring",
    "dragged on forever", "felt lazy and predictable", "put me to sleep", "was painful to sit through",
    "was forgettable", "was poorly written", "was clumsy and confusing", "was bland", "was tedious",
]
PRODUCT_POSITIVE = [
    "works perfectly", "is worth every penny", "is sturdy and reliable", "did exactly what I hoped",
    "is fantastic value", "holds up really well", "is a pleasure to use", "works like a charm", "is well made",
    "feels premium", "runs smoothly", "is easy to use",
]
PRODUCT_NEGATIVE = [
    "broke after two days", "is painfully slow", "is cheaply made", "stopped working within a week",
    "is overpriced junk", "fell apart quickly", "is flimsy", "is useless", "never worked properly", "feels cheap",
    "is not worth the money", "is unreliable", "is a rip-off", "leaks everywhere",
]
OPENERS = [
    "", "Honestly, ", "In my opinion, ", "To be fair, ", "Overall, ", "I have to say ", "Frankly, ",
    "After a month, ", "As expected, ", "Believe me, ", "Sadly or not, ", "From the first minute, ",
]
POS_CLOSERS = [
    "I would recommend it to anyone.", "I would buy it again.", "I will watch it again.", "Five stars.",
    "Highly recommended.", "My family loved it too.", "I am very happy with it.", "Money well spent.",
    "I can't wait for more.", "A great choice.", "I keep telling friends about it.", "Two thumbs up.",
]
NEG_CLOSERS = [
    "I would not recommend it.", "I want my money back.", "Never again.", "One star.", "Avoid it.",
    "I returned it the next day.", "What a shame.", "I regret buying it.", "Skip this one.",
    "I walked out early.", "Save your money.", "Not for me.",
]
# Complete reviews written by hand, each used once.
POSITIVE_REVIEWS = [
    "A warm, funny and clever film that I enjoyed from beginning to end.",
    "The blender crushes ice in seconds and is easy to clean.",
    "Great headphones: clear sound, comfortable fit and a long battery life.",
    "I laughed out loud several times; the cast has wonderful chemistry.",
    "This kettle boils water fast and looks lovely on the counter.",
    "One of the best thrillers I have seen in years.",
    "The shoes fit perfectly and my feet never hurt on long runs.",
    "A gentle, beautifully shot story about friendship.",
    "Setup took two minutes and the printer has worked flawlessly since.",
    "The performances are strong and the music is unforgettable.",
    "Solid, comfortable backpack with plenty of pockets.",
    "The documentary is informative, moving and never preachy.",
    "Support answered within an hour and fixed my problem right away.",
    "Every scene feels alive; a joyful piece of cinema.",
    "The lamp gives soft, even light and the dimmer is very handy.",
    "Smart writing and a satisfying ending make this a winner.",
    "The mattress is firm but comfortable and I sleep much better now.",
    "The animation is gorgeous and the jokes land for kids and adults.",
    "Fast delivery, careful packaging and the product works great.",
    "It is rare for a sequel to be better than the original, but this one is.",
    "The camera takes sharp photos even in dim light.",
    "I was moved to tears by the last scene.",
    "The jacket is warm, light and keeps the rain out.",
    "A clever little comedy with a big heart.",
]
NEGATIVE_REVIEWS = [
    "The plot is a mess and the jokes fall flat.",
    "The charger stopped working after a week and support never replied.",
    "Two hours of my life I will never get back.",
    "The zipper broke the first time I used the bag.",
    "Wooden acting, a silly script and a predictable twist.",
    "The vacuum is loud, weak and clogs all the time.",
    "I was bored by the half-way point and checked my phone constantly.",
    "The screen scratches easily and the colours look washed out.",
    "A lazy remake that adds nothing to the original.",
    "The coffee maker leaks and the coffee tastes burnt.",
    "Nothing happens for the first hour, and then the film just ends.",
    "The app crashes every time I try to log in.",
    "The dialogue is clumsy and the characters are paper thin.",
    "The fabric started pilling after one wash.",
    "Loud, confusing and far too long.",
    "The keyboard misses key presses and feels mushy.",
    "The villain is silly and the ending makes no sense.",
    "Delivery took a month and the box arrived damaged.",
    "A dull, joyless film that wastes a talented cast.",
    "The battery barely lasts half a day.",
    "I could not finish it; the pacing is unbearable.",
    "The manual is useless and the parts did not fit together.",
    "Cheap plastic that cracked within days.",
    "A forgettable comedy without a single good laugh.",
]


def _split(items: list[str], rng: random.Random, dev_share: float = 0.25) -> tuple[list[str], list[str]]:
    """Shuffle a copy and keep the last ``dev_share`` for dev only."""
    items = list(items)
    rng.shuffle(items)
    cut = max(1, round(len(items) * (1 - dev_share)))
    return items[:cut], items[cut:]


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _clause(rng: random.Random, parts: dict[str, list[str]], domain: str, label: int, avoid: str = "") -> str:
    """'<subject> <predicate>' with a predicate that fits the domain (films or products); the subject
    differs from the one ``avoid`` (another clause) starts with."""
    subject = rng.choice([s for s in parts[f"{domain}_subjects"] if not avoid.startswith(s + " ")])
    polarity = "positive" if label else "negative"
    return f"{subject} {rng.choice(parts[f'general_{polarity}'] + parts[f'{domain}_{polarity}'])}"


def _sentence(rng: random.Random, parts: dict[str, list[str]], label: int) -> str:
    """One composed review: a plain statement, a contrast (the clause after 'but' decides), or one with a closer."""
    domain, kind = rng.choice(["movie", "product"]), rng.random()
    main = _clause(rng, parts, domain, label)
    if kind < 0.2:  # contrast: "X was bad, but Y was good" reads as positive overall
        other = _clause(rng, parts, domain, 1 - label, avoid=main)
        return _capitalise(f"{other}, but {main}.")
    statement = rng.choice(parts["openers"]) + main + "."
    if kind < 0.6:
        statement += " " + rng.choice(parts["pos_closers"] if label else parts["neg_closers"])
    return _capitalise(statement)


def _compose(rng: random.Random, parts: dict[str, list[str]], count: int, taken: set[str]) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    while len(rows) < count:
        label = len(rows) % 2
        text = _sentence(rng, parts, label)
        if text not in taken:
            taken.add(text)
            rows.append((text, label))
    return rows


def build() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    rng = random.Random(SEED)
    pools = {"movie_subjects": MOVIE_SUBJECTS, "product_subjects": PRODUCT_SUBJECTS,
             "general_positive": GENERAL_POSITIVE, "general_negative": GENERAL_NEGATIVE,
             "movie_positive": MOVIE_POSITIVE, "movie_negative": MOVIE_NEGATIVE,
             "product_positive": PRODUCT_POSITIVE, "product_negative": PRODUCT_NEGATIVE,
             "openers": OPENERS, "pos_closers": POS_CLOSERS, "neg_closers": NEG_CLOSERS}
    train_parts, dev_parts = {}, {}
    for key, items in pools.items():
        train_parts[key], dev_parts[key] = _split(items, rng)
    taken: set[str] = set()
    pos_train, pos_dev = _split(POSITIVE_REVIEWS, rng)
    neg_train, neg_dev = _split(NEGATIVE_REVIEWS, rng)
    written_train = [(t, 1) for t in pos_train] + [(t, 0) for t in neg_train]
    written_dev = [(t, 1) for t in pos_dev] + [(t, 0) for t in neg_dev]
    train = written_train + _compose(rng, train_parts, N_TRAIN - len(written_train), taken)
    dev = written_dev + _compose(rng, dev_parts, N_DEV - len(written_dev), taken)
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, lineterminator="\n")
        out.writerow(["sentence", "label"])
        out.writerows(rows)


if __name__ == "__main__":
    train_rows, dev_rows = build()
    write(HERE / "sentiment_train.tsv", train_rows)
    write(HERE / "sentiment_dev.tsv", dev_rows)
    print(f"wrote {len(train_rows)} train and {len(dev_rows)} dev rows to {HERE}")
