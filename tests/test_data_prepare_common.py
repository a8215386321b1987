"""Shared tiny documents for the `kiln data prepare` tests (no tests here): clean prose that passes every default filter."""

from __future__ import annotations

import numpy as np

from kiln.data.pack import iter_documents
from kiln.data.tokenizer import bundled_corpus_path

PROSE = (
    "The river runs past the old mill and the children walk along its bank to school each morning. "
    "In spring the water rises with the melting snow, and the farmers wait for the fields to dry before "
    "they plant their seed. A small bridge of grey stone crosses the stream near the church, where the "
    "baker has his shop and sells bread that is still warm to anyone who comes early enough. Travellers "
    "often stop there to rest their horses, to ask for directions to the city, and to hear the latest news "
    "from the valley, which the baker is always happy to share with them over a cup of strong tea."
)


def prose(seed: int, n_words: int = 120) -> str:
    """A distinct, clean document: KJV-vocabulary bigram-free shuffle wrapped around real prose."""
    rng = np.random.default_rng(seed)
    words = PROSE.split()
    picked = [words[i] for i in rng.integers(0, len(words), size=n_words)]
    lines = [" ".join(picked[i:i + 15]) + "." for i in range(0, n_words, 15)]
    return f"Document {seed}: the story of the valley.\n" + "\n".join(lines)


def kjv_chapters(n: int, min_words: int = 120, max_words: int = 200) -> list[str]:
    """``n`` chapters of the bundled corpus (verse numbers dropped), cut to at most ``max_words`` words."""
    out = []
    for doc in iter_documents([bundled_corpus_path()]):
        words = [w for w in doc.split() if not w.replace(":", "").isdigit()][1:]
        if len(words) >= min_words:
            out.append(" ".join(words[:max_words]))
        if len(out) == n:
            break
    return out
