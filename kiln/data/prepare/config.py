"""The typed config of `kiln data prepare`: one dataclass per step, loaded from YAML.

Every section validates itself in ``__post_init__``; an unknown key is an error that names the
nearest valid one (the same loader as the run config, :func:`kiln.config._build`). Command-line
flags (``--seq-len``, ``--dedup``) override the file. Defaults follow the Gopher paper (Rae et
al. 2021, appendix A.1.1) for quality and repetition, and common MinHash-LSH practice for dedup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.config import _build, _check, read_yaml_mapping
from kiln.errors import KilnConfigError


@dataclass(kw_only=True, slots=True)
class InputConfig:
    """How files become documents."""

    text_field: str = "text"
    """JSONL key / Parquet column holding the document text."""
    text_mode: Literal["blocks", "file"] = "blocks"
    """Plain text: one document per blank-line separated block (kiln's packer), or per file."""
    chunk_bytes: int = 8 << 20
    """Work unit: plain JSONL/text files are cut into chunks of about this many bytes (record-aligned)."""

    def __post_init__(self) -> None:
        _check(bool(self.text_field), "input.text_field must not be empty")
        _check(self.chunk_bytes >= 1024, f"input.chunk_bytes must be >= 1024, got {self.chunk_bytes}")


@dataclass(kw_only=True, slots=True)
class NormalizeConfig:
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normal form applied to every document before anything else."""


@dataclass(kw_only=True, slots=True)
class QualityConfig:
    """Gopher quality and repetition heuristics; a document failing any one is dropped."""

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    """Upper bound, separately, for '#' per word and for ellipses ('...', '…') per word."""
    max_bullet_lines_frac: float = 0.9
    """Fraction of lines starting with a bullet (•, -, *, ‣, ●, ◦, ▪)."""
    max_ellipsis_lines_frac: float = 0.3
    """Fraction of lines ending with an ellipsis."""
    min_alpha_words_frac: float = 0.8
    """Fraction of words that contain at least one alphabetic character."""
    min_stop_words: int = 2
    """At least this many of: the, be, to, of, and, that, have, with (0 disables)."""
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    max_top_2gram_char_frac: float = 0.20
    max_top_3gram_char_frac: float = 0.18
    max_top_4gram_char_frac: float = 0.16
    max_dup_5gram_char_frac: float = 0.15
    max_dup_6gram_char_frac: float = 0.14
    max_dup_7gram_char_frac: float = 0.13
    max_dup_8gram_char_frac: float = 0.12
    max_dup_9gram_char_frac: float = 0.11
    max_dup_10gram_char_frac: float = 0.10

    def __post_init__(self) -> None:
        _check(self.min_words >= 0, f"quality.min_words must be >= 0, got {self.min_words}")
        _check(self.max_words >= self.min_words,
               f"quality.max_words({self.max_words}) must be >= quality.min_words({self.min_words})")
        _check(0 <= self.min_mean_word_length <= self.max_mean_word_length,
               f"quality.min_mean_word_length({self.min_mean_word_length}) must be in "
               f"[0, quality.max_mean_word_length({self.max_mean_word_length})]")
        _check(self.min_stop_words >= 0, f"quality.min_stop_words must be >= 0, got {self.min_stop_words}")
        _check(self.max_symbol_word_ratio >= 0,
               f"quality.max_symbol_word_ratio must be >= 0, got {self.max_symbol_word_ratio}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_frac"):
                v = getattr(self, f.name)
                _check(0 <= v <= 1, f"quality.{f.name} must be in [0, 1], got {v}")

    def top_ngram_limits(self) -> dict[int, float]:
        return {n: getattr(self, f"max_top_{n}gram_char_frac") for n in (2, 3, 4)}

    def dup_ngram_limits(self) -> dict[int, float]:
        return {n: getattr(self, f"max_dup_{n}gram_char_frac") for n in range(5, 11)}


@dataclass(kw_only=True, slots=True)
class PiiConfig:
    """Replace personal data with placeholders, per kind."""

    email: bool = True
    """E-mail addresses -> <EMAIL>."""
    phone: bool = True
    """Phone numbers (10 to 15 digits with separators) -> <PHONE>."""
    ip: bool = True
    """IPv4 and IPv6 addresses -> <IP_ADDRESS>."""


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """Whole-dataset deduplication; the first occurrence in document order is kept."""

    mode: Literal["exact", "near", "none"] = "exact"
    """exact: hash of lowercased, punctuation-stripped, whitespace-collapsed text; near: exact + MinHash LSH."""
    shingle_size: int = 5
    """MinHash shingles are word n-grams of this length (of the same normalised text)."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    bands: int = 32
    rows: int = 4
    """LSH: bands × rows <= num_perm; a pair becomes a candidate when one band matches exactly."""
    threshold: float = 0.7
    """A candidate is a duplicate when the signatures' estimated Jaccard similarity is >= this."""

    def __post_init__(self) -> None:
        _check(self.shingle_size >= 1, f"dedup.shingle_size must be >= 1, got {self.shingle_size}")
        _check(self.num_perm >= 1, f"dedup.num_perm must be >= 1, got {self.num_perm}")
        _check(self.bands >= 1 and self.rows >= 1, f"dedup.bands({self.bands}) and dedup.rows({self.rows}) must be >= 1")
        _check(self.bands * self.rows <= self.num_perm,
               f"dedup.bands({self.bands}) × dedup.rows({self.rows}) = {self.bands * self.rows} "
               f"exceeds dedup.num_perm({self.num_perm})")
        _check(0 < self.threshold <= 1, f"dedup.threshold must be in (0, 1], got {self.threshold}")


@dataclass(kw_only=True, slots=True)
class FimConfig:
    """Fill-in-the-middle, applied per document before packing (Bavarian et al. 2022)."""

    rate: float = 0.0
    """Fraction of documents turned into FIM examples; 0 disables (plain causal LM)."""
    spm_rate: float = 0.5
    """Of the FIM documents, the fraction in SPM order (the rest PSM)."""

    def __post_init__(self) -> None:
        _check(0 <= self.rate <= 1, f"fim.rate must be in [0, 1], got {self.rate}")
        _check(0 <= self.spm_rate <= 1, f"fim.spm_rate must be in [0, 1], got {self.spm_rate}")


@dataclass(kw_only=True, slots=True)
class PackConfig:
    seq_len: int = 2048
    """Tokens per training sample (each MDS sample holds seq_len + 1, as the trainer expects)."""
    shard_size_limit: int = 1 << 26
    """Bytes per MDS shard (before compression)."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 1, f"pack.seq_len must be >= 1, got {self.seq_len}")
        _check(self.shard_size_limit >= 1024, f"pack.shard_size_limit must be >= 1024, got {self.shard_size_limit}")


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """Everything that decides the output of `kiln data prepare` (not how fast it runs)."""

    seed: int = 1234
    """Seeds the FIM choices; the same seed and inputs give the same dataset."""
    input: InputConfig = field(default_factory=InputConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    fim: FimConfig = field(default_factory=FimConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def prepare_config_from_dict(raw: dict[str, Any] | None) -> PrepareConfig:
    return _build(PrepareConfig, raw or {}, "")


def load_prepare_config(path: str | None, *, seq_len: int | None = None, dedup: str | None = None) -> PrepareConfig:
    """Read the YAML file (if any), apply the command-line flags, validate."""
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml_mapping(path, what="prepare config file")
    if seq_len is not None:
        raw["pack"] = {**(raw.get("pack") or {}), "seq_len": seq_len}
    if dedup is not None:
        raw["dedup"] = {**(raw.get("dedup") or {}), "mode": dedup}
    return prepare_config_from_dict(raw)
