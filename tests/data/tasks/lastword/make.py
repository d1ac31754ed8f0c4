"""Rebuild lastword.jsonl: 200 sentences of the built-in enwiki test split (12-40 words, ending in a plain word and
a full stop), shuffled with seed 0; the context is the sentence without its last word, the target that word.
Run from the repository root: python tests/data/tasks/lastword/make.py"""
import json
import random
import re
from pathlib import Path

from secateurs.data import load_text
text = load_text("enwiki", "test")
sents = []
for para in text.split("\n"):
    para = para.strip()
    if not para or para.startswith("="):
        continue
    for s in re.split(r"(?<=[.!?])\s+", para):
        words = s.split()
        if 12 <= len(words) <= 40 and s.endswith(".") and re.fullmatch(r"[A-Za-z]{3,}\.", words[-1]):
            sents.append((" ".join(words[:-1]), words[-1][:-1]))
random.Random(0).shuffle(sents)
with open(Path(__file__).with_name("lastword.jsonl"), "w") as f:
    for ctx, tgt in sents[:200]:
        f.write(json.dumps({"context": ctx, "target": tgt}) + "\n")
print(len(sents))
