"""kiln's data path: tokenizers, packing text into MDS shards, and the train loader."""

from kiln.data.bundled import default_cache_dir, ensure_bundled_dataset
from kiln.data.loader import TrainLoader, build_train_loader, clean_stale_shm, dataset_seq_len
from kiln.data.pack import PackStats, is_complete_dataset, pack_text_to_mds, read_meta, write_samples_to_mds
from kiln.data.tokenizer import (EOS_TOKEN, KilnTokenizer, bundled_corpus_path, bundled_tokenizer_path,
                                 load_tokenizer, train_bpe_tokenizer)

__all__ = [
    "EOS_TOKEN", "KilnTokenizer", "PackStats", "TrainLoader", "build_train_loader", "bundled_corpus_path",
    "bundled_tokenizer_path", "clean_stale_shm", "dataset_seq_len", "default_cache_dir", "ensure_bundled_dataset",
    "is_complete_dataset", "load_tokenizer", "pack_text_to_mds", "read_meta", "train_bpe_tokenizer",
    "write_samples_to_mds",
]
