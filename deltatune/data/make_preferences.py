"""Write preferences_train.jsonl / preferences_dev.jsonl: preference pairs derived from the bundled sentiment set.

Each review of ``sentiment_train.tsv`` / ``sentiment_dev.tsv`` becomes one ``prompt / chosen / rejected`` record:
the prompt asks for the review's sentiment, the chosen answer names the right one, the rejected answer the wrong
one. Half the chosen answers say "positive", half "negative", so a model that always prefers one word is right
half the time: preference accuracy above 0.5 on the dev pairs (held-out wording, see README.md) means the delta
learned to read the review. Deterministic: ``python deltatune/data/make_preferences.py`` rewrites both files
byte for byte.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Is the following review positive or negative?\n\n{sentence}"
ANSWER = "The review is {}."


def pairs(tsv: Path) -> list[dict[str, str]]:
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out = []
    for row in rows:
        right, wrong = ("positive", "negative") if row["label"] == "1" else ("negative", "positive")
        out.append({"prompt": PROMPT.format(sentence=row["sentence"]), "chosen": ANSWER.format(right),
                    "rejected": ANSWER.format(wrong)})
    return out


def main() -> None:
    for split in ("train", "dev"):
        records = pairs(HERE / f"sentiment_{split}.tsv")
        (HERE / f"preferences_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"preferences_{split}.jsonl: {len(records)} pairs")


if __name__ == "__main__":
    main()
