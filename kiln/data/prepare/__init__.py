"""`kiln data prepare`: inputs → clean → dedup → tokenize → pack into MDS shards the trainer reads.

Split by responsibility: ``inputs`` (files → chunks → documents), ``text`` (normalisation, word
tables), ``quality`` (Gopher heuristics), ``pii`` (scrubbing), ``dedup`` (exact and MinHash LSH),
``encode`` (tokenizing, FIM), ``segments`` (the worker's cache of text segments: tokens, words
and counts per distinct segment), ``worker`` (one chunk), ``pipeline`` (the resumable whole),
``tokenizer`` (`train-tokenizer`), ``stats`` and ``cli``.
"""

from kiln.data.prepare.config import PrepareConfig, load_prepare_config, prepare_config_from_dict
from kiln.data.prepare.pipeline import prepare
from kiln.data.prepare.tokenizer import train_tokenizer

__all__ = ["PrepareConfig", "load_prepare_config", "prepare", "prepare_config_from_dict", "train_tokenizer"]
