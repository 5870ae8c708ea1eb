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

from stitching.data.sampling import describe, spread_sample, stratified_sample
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
        from stitching.models.language import read_tokenizer, vocabulary_name

        self.tokenizer = read_tokenizer(folder, **kwargs)

        self.vocab_size = len(self.tokenizer.get_vocab())
        self.eos_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.name = vocabulary_name(self.tokenizer)  # two tokenizers with one vocabulary share this

    def encode(self, text: str) -> list[int]:
        # a whole document at once (cut into sequences later): no warning about the model's context
        return self.tokenizer.encode(text, add_special_tokens=False, verbose=False)

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
        train_sequences, test_sequences: keep N sequences of each split, one from each of N equal
            blocks of it (seeded by ``seed``; the corpus runs topic by topic, so its first N
            sequences would be a few topics); ``None``: all.
    """

    kind = "text"

    def __init__(self, name: str = "pydoc", corpus: str = "pydoc", tokenizer: str = "bytes", context: int = 64,
                 batch_size: int = 32, num_workers: int = 0, train_sequences: int | None = None,
                 test_sequences: int | None = None, num_classes: int | None = None, kind: str = "text", seed: int = 0):
        super().__init__()
        self.seed, self.subsets = int(seed), {}  # how each subset was drawn, for the record
        self.num_classes = num_classes  # None: next-token prediction
        self.name, self.corpus, self.tokenizer_spec, self.context = name, corpus, tokenizer, int(context)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.train_sequences, self.test_sequences = train_sequences, test_sequences
        self.arrays: TextArrays | None = None
        #: a stitching run's seed, which alone orders its training batches (``None``: the global
        #: generator, as a base model's training seeds it); the device is the run's
        self.stream_seed: int | None = None
        self.device = torch.device("cpu")

    def order(self) -> torch.Generator | None:
        """The generator of the training order: seeded by ``stream_seed`` alone, so a run's batches
        come in the same order however much randomness was drawn before it (models loaded, other runs)."""
        return None if self.stream_seed is None else torch.Generator().manual_seed(int(self.stream_seed))

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        train, test = _cached_sequences(self.corpus, self.tokenizer_spec, self.context)
        self.arrays = TextArrays(self._spread(train, "train_sequences"), self._spread(test, "test_sequences"))

    def _spread(self, ids: torch.Tensor, key: str) -> torch.Tensor:
        """``dataset.<key>`` sequences spread over the whole (topic-ordered) split, not its first N."""
        count = getattr(self, key)
        if count is None:
            return ids
        self.subsets[key] = describe(min(count, len(ids)), len(ids), "one per equal block of the split", self.seed)
        return ids[spread_sample(count, len(ids), self.seed)]

    @cached_property
    def tokenizer(self):
        return tokenizer_for(self.tokenizer_spec)  # read once: a folder's tokenizer is not free to load

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(TokenDataset(self.arrays.train), batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, generator=self.order())

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


# -- sentence pairs (natural-language inference) ----------------------------------------------
def pair_rows(corpus: str, split: str, subset: str | None = None) -> list[dict]:
    """The rows of one split: a folder holding ``<split>.jsonl`` (offline), or a Hugging Face
    ``datasets`` name with its configuration (``nyu-mll/glue`` + ``mnli``; online)."""
    folder = Path(str(corpus)).expanduser()
    try:
        import datasets

        if folder.is_dir():
            files = {split: str(folder / f"{split}.jsonl")}
            if not Path(files[split]).is_file():
                raise StitchingError(f"{folder} has no {split}.jsonl; a local sentence-pair corpus holds one JSON "
                                     f"lines file per split")
            return list(datasets.load_dataset("json", data_files=files, split=split))
        return list(datasets.load_dataset(corpus, subset, split=split))
    except StitchingError:
        raise
    except Exception as err:  # offline, unknown name or split: one line
        raise StitchingError(f"sentence pairs '{corpus}'{f' ({subset})' if subset else ''} split '{split}' cannot be "
                             f"loaded ({type(err).__name__}: {str(err).splitlines()[0][:120]}); offline, point "
                             f"dataset.corpus at a folder of <split>.jsonl files") from None


class PairDataset(Dataset):
    """Tokenised sentence pairs (``[CLS] a [SEP] b [SEP]``) with their labels."""

    def __init__(self, rows: list[dict], tokenizer, fields: tuple[str, str], label: str, context: int):
        if not isinstance(tokenizer, FolderTokenizer):
            raise StitchingError("sentence pairs are read with the model's own tokenizer: set dataset.tokenizer to "
                                 "the model's folder (or hub name)")
        missing = [key for key in (*fields, label) if rows and key not in rows[0]]
        if missing:
            raise StitchingError(f"the sentence pairs have no field(s) {', '.join(missing)}; they have "
                                 f"{', '.join(rows[0])} (dataset.pairs.fields / dataset.pairs.label)")
        rows = [r for r in rows if int(r[label]) >= 0]  # unlabelled rows (-1 in GLUE's test splits) never count
        encoded = tokenizer.tokenizer([r[fields[0]] for r in rows], [r[fields[1]] for r in rows], truncation=True,
                                      max_length=context)
        self.ids = encoded["input_ids"]
        self.types = encoded.get("token_type_ids") or [[0] * len(ids) for ids in self.ids]
        self.labels = [int(r[label]) for r in rows]
        self.pad_id = tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return self.ids[i], self.types[i], self.labels[i]

    def collate(self, items: list) -> dict:
        """A batch padded on the right to its longest pair; padding is masked out."""
        length = max(len(ids) for ids, _, _ in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for n, (row, kinds, _) in enumerate(items):
            ids[n, : len(row)] = torch.tensor(row)
            types[n, : len(kinds)] = torch.tensor(kinds)
            mask[n, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                "labels": torch.tensor([label for _, _, label in items])}


class PairDataModule(TextDataModule):
    """Sentence pairs with a class label (MNLI), scored by a sequence classifier; an optional
    challenge set (HANS) is a second test whose labels are coarser (entailment / not)."""

    def __init__(self, pairs: dict, challenge: dict | None = None, **options):
        super().__init__(**options)
        self.pairs, self.challenge = dict(pairs), dict(challenge) if challenge else None
        self.train_set: PairDataset | None = None
        self.test_set: PairDataset | None = None

    def _read(self, corpus: str, split: str, subset: str | None, limit: int | None, spec: dict) -> PairDataset:
        rows = pair_rows(corpus, split, subset)
        where = spec.get("where") or {}  # e.g. HANS' lexical-overlap cases only
        rows = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
        if limit is not None and rows:  # every label in proportion, not the split's first rows
            field = spec.get("label") or self.pairs["label"]
            names = sorted({str(r.get(field)) for r in rows})
            labels = torch.tensor([names.index(str(r.get(field))) for r in rows])
            self.subsets[f"{split}_rows"] = describe(min(limit, len(rows)), len(rows), "stratified by label", self.seed)
            rows = [rows[i] for i in stratified_sample(labels, limit, self.seed).tolist()]
        if not rows:
            raise StitchingError(f"no sentence pairs in '{corpus}' split '{split}'"
                                 + (f" where {where}" if where else "") + "; check the corpus and its filter")
        data = PairDataset(rows, self.tokenizer, tuple(spec.get("fields") or self.pairs["fields"]),
                           spec.get("label") or self.pairs["label"], self.context)
        order = spec.get("label_map")  # the data's label → the classifier's class, when their orders differ
        if order:
            data.labels = [int(order[label]) for label in data.labels]
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        subset = self.pairs.get("subset")
        self.train_set = self._read(self.corpus, self.pairs["train_split"], subset, self.train_sequences, self.pairs)
        self.test_set = self._read(self.corpus, self.pairs["test_split"], subset, self.test_sequences, self.pairs)
        self.arrays = TextArrays(torch.empty(len(self.train_set), 0), torch.empty(len(self.test_set), 0))

    def challenge_set(self) -> PairDataset | None:
        """The challenge test set (labels as in its own corpus), or ``None``."""
        if not self.challenge:
            return None
        spec = self.challenge
        return self._read(spec["corpus"], spec["split"], spec.get("subset"), self.test_sequences, spec)

    def loader(self, data: PairDataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=data.collate, generator=self.order() if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.loader(self.train_set, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self.loader(self.test_set)

    def sample_train_inputs(self, n: int, seed: int = 0) -> dict:
        self.setup()
        pick = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed))[:n]
        batch = self.train_set.collate([self.train_set[int(i)] for i in pick])
        return {k: v for k, v in batch.items() if k != "labels"}

    def test_inputs(self, n: int | None = None) -> dict:
        self.setup()
        batch = self.test_set.collate([self.test_set[i] for i in range(len(self.test_set))[:n]])
        return {k: v for k, v in batch.items() if k != "labels"}
