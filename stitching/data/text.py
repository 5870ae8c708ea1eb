"""Text for language-model stitching: corpora, tokenizers, fixed-length sequences.

The embedded corpus (``corpus=pydoc``) is the English documentation that ships with
CPython itself, ``pydoc_data.topics``: 79 topics, about 466 000 UTF-8 bytes. The split is
deterministic: the last tenth of every topic (from a line break) is test. Each split is
tokenised, joined with an end-of-text token after every topic, and cut into sequences of
``context`` tokens (the remainder is dropped), so every position is a real token.

Tokenizers: ``bytes`` (UTF-8 bytes 0–255 and an end-of-text id 256: what the language
models trained here read) or a folder holding a Hugging Face tokenizer (a given model's
own). Hugging Face ``datasets`` corpora by name (``corpus=NeelNanda/pile-10k``) load when
the hub or its cache can be reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from stitching.errors import StitchingError

EMBEDDED = ("pydoc",)


class ByteTokenizer:
    """UTF-8 bytes as tokens, and one end-of-text token."""

    vocab_size = 257
    eos_id = 256
    pad_id = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class FolderTokenizer:
    """A Hugging Face tokenizer from a local folder (a given model's own)."""

    def __init__(self, folder: str | Path, **kwargs):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as err:
            raise StitchingError(f"no tokenizer can be read from {folder} ({str(err).splitlines()[0][:120]}); "
                                 f"point dataset.tokenizer at the model's folder (or its hub name, online)") from None
        from stitching.models.language import vocabulary_name

        self.vocab_size = len(self.tokenizer.get_vocab())
        self.eos_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.name = vocabulary_name(self.tokenizer)  # two tokenizers with one vocabulary share this

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def tokenizer_for(spec: str | None):
    return ByteTokenizer() if spec in (None, "bytes") else FolderTokenizer(spec)


def embedded_documents(corpus: str) -> tuple[list[str], list[str]]:
    """``(train, test)`` documents of an embedded corpus."""
    if corpus != "pydoc":
        raise StitchingError(f"unknown embedded corpus '{corpus}'; embedded: {', '.join(EMBEDDED)}")
    from pydoc_data.topics import topics

    train, test = [], []
    for key in sorted(topics):  # the last tenth of every topic, from a line break, is test
        text = topics[key]
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
        train.append(text[:cut])
        test.append(text[cut:])
    return train, test


def hub_documents(corpus: str, field: str = "text", test_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """A Hugging Face ``datasets`` corpus (its train split; the last ``test_fraction`` is test)."""
    try:
        import datasets

        rows = datasets.load_dataset(corpus, split="train")[field]
    except Exception as err:  # offline, unknown name, no such field: one line
        raise StitchingError(f"corpus '{corpus}' cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                             f"offline, use the embedded corpus (dataset.corpus=pydoc)") from None
    cut = int(len(rows) * (1 - test_fraction))
    return list(rows[:cut]), list(rows[cut:])


def sequences(documents: list[str], tokenizer, context: int) -> torch.Tensor:
    """The documents as one token stream (end-of-text after each) cut into ``[N, context]``."""
    stream: list[int] = []
    for document in documents:
        stream += tokenizer.encode(document) + [tokenizer.eos_id]
    count = len(stream) // context
    if count == 0:
        raise StitchingError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {context}; "
                             f"lower dataset.context")
    return torch.tensor(stream[: count * context], dtype=torch.long).view(count, context)


@lru_cache(maxsize=8)
def _cached_sequences(corpus: str, tokenizer: str, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    documents = embedded_documents(corpus) if corpus in EMBEDDED else hub_documents(corpus)
    tok = tokenizer_for(tokenizer)
    return sequences(documents[0], tok, context), sequences(documents[1], tok, context)


class TokenDataset(Dataset):
    """Fixed-length sequences as dicts of ``input_ids`` and ``attention_mask``."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


@dataclass
class TextArrays:
    train: torch.Tensor  # [N, context] token ids
    test: torch.Tensor


class TextDataModule(L.LightningDataModule):
    """A tokenised corpus as batches of ``{input_ids, attention_mask}``.

    Args:
        name: the dataset's name (for records and the zoo).
        corpus: ``pydoc`` (embedded) or a Hugging Face ``datasets`` name.
        tokenizer: ``bytes`` or a folder with a Hugging Face tokenizer.
        context: tokens per sequence.
        batch_size, num_workers: loader settings.
        train_sequences, test_sequences: keep only the first N of each split (``None``: all).
    """

    kind = "text"

    def __init__(self, name: str = "pydoc", corpus: str = "pydoc", tokenizer: str = "bytes", context: int = 64,
                 batch_size: int = 32, num_workers: int = 0, train_sequences: int | None = None,
                 test_sequences: int | None = None, num_classes: int | None = None, kind: str = "text"):
        super().__init__()
        self.num_classes = num_classes  # None: next-token prediction
        self.name, self.corpus, self.tokenizer_spec, self.context = name, corpus, tokenizer, int(context)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.train_sequences, self.test_sequences = train_sequences, test_sequences
        self.arrays: TextArrays | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        train, test = _cached_sequences(self.corpus, self.tokenizer_spec, self.context)
        self.arrays = TextArrays(train[: self.train_sequences], test[: self.test_sequences])

    @cached_property
    def tokenizer(self):
        return tokenizer_for(self.tokenizer_spec)  # read once: a folder's tokenizer is not free to load

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(TokenDataset(self.arrays.train), batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(TokenDataset(self.arrays.test), batch_size=self.batch_size, num_workers=self.num_workers)

    def sample_train_inputs(self, n: int, seed: int = 0) -> dict:
        """``n`` training sequences (the DM initialisation's samples), seeded."""
        self.setup()
        pick = torch.randperm(len(self.arrays.train), generator=torch.Generator().manual_seed(seed))[:n]
        ids = self.arrays.train[pick]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def test_inputs(self, n: int | None = None) -> dict:
        self.setup()
        ids = self.arrays.test[:n]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
