"""The forms ``--data`` takes, and the readers of those that are not plain text.

- text: a UTF-8 file, a folder of them or a quoted glob (``data.py`` tokenizes them);
- token ids, memory-mapped (a batch reads its own slices, nothing else is loaded): a nanoGPT-style
  folder with ``train.bin`` and ``val.bin`` (raw ids, uint16 unless ``--data-dtype``; ``meta.pkl``'s
  ``vocab_size`` when present), or one ``.bin`` or ``.npy`` file whose tail is held out;
- records with a text column (``--text-field``, default ``text``): a ``.jsonl``/``.json``/``.parquet``/
  ``.csv`` file, a folder or glob of files of one such kind, or a folder ``datasets.save_to_disk``
  wrote. Hugging Face ``datasets`` (the ``data`` extra) reads them from local files only; each
  record's text is one document, tokenized by ``data.py`` like a text file.

Importing this module imports neither torch nor ``datasets``.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import MstCompileError

RECORD_READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # suffix -> datasets builder
VAL_SPLITS = ("validation", "valid", "val", "test")  # a saved DatasetDict's held-out split: the first it has
FORMS = ("--data reads UTF-8 text (a file, folder or quoted glob), token ids (.bin or .npy, or a folder with train.bin "
         "and val.bin) and records with a text column (.jsonl/.json/.parquet/.csv, a datasets.save_to_disk folder); "
         "for any other format define data() in the model file, returning token ids or get_batch(split, index)")


# -- which form ------------------------------------------------------------------------------
def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def matching_files(spec: str) -> list[Path]:
    """The files ``spec`` names: itself, a folder's (hidden ones left out, sorted) or a glob's matches."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        found = []
        for d, dirs, names in os.walk(p):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            found += [Path(d) / n for n in sorted(names) if not n.startswith(".")]
    elif _is_glob(spec):
        found = [Path(f) for f in sorted(glob.glob(str(p), recursive=True))]
    else:
        raise MstCompileError(f"--data {spec}: no such file or folder (expected a file, a folder or a quoted glob like 'docs/*.txt')")
    return [f for f in found if f.is_file()]


def kind_of(spec: str) -> str:
    """How ``--data spec`` is read: ``"tokens"``, ``"records"``, ``"saved"`` (save_to_disk) or ``"text"``."""
    p = Path(spec).expanduser()
    if p.is_dir() and ((p / "train.bin").is_file() or (p / "val.bin").is_file()):
        return "tokens"
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        return "saved"
    if p.is_file() and p.suffix.lower() in (".bin", ".npy"):
        return "tokens"
    if not (p.exists() or _is_glob(spec)):
        return "text"  # data.data_files says it does not exist
    readers = {RECORD_READERS.get(f.suffix.lower()) for f in matching_files(spec)}
    return "records" if len(readers) == 1 and None not in readers else "text"


def check_flags(spec: str | None, kind: str, tokenizer: str | None, data_dtype: str | None, text_field: str | None) -> None:
    """Refuse a data flag that the form of the data would ignore."""
    what = {"tokens": "token ids", "records": "records", "saved": "records", "text": "text"}[kind]
    data = f"--data {spec}" if spec else "the built-in corpus"
    if data_dtype is not None and kind != "tokens":
        raise MstCompileError(f"--data-dtype {data_dtype} is for token-id files (.bin, a folder with train.bin and val.bin); {data} is {what}")
    if text_field is not None and kind not in ("records", "saved"):
        raise MstCompileError(f"--text-field {text_field} is for records (.jsonl/.json/.parquet/.csv, a save_to_disk folder); {data} is {what}")
    if tokenizer is not None and kind == "tokens":
        raise MstCompileError(f"--tokenizer {tokenizer}: {data} holds token ids already; drop --tokenizer")


# -- token ids -------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Unpickling runs code named in the file; nanoGPT's meta.pkl needs none (dicts, strings, ints)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain dicts, strings and numbers are read")


def meta_vocab(folder: Path) -> int | None:
    """``vocab_size`` of nanoGPT's ``meta.pkl`` in ``folder``, None without one."""
    f = folder / "meta.pkl"
    if not f.is_file():
        return None
    try:
        with open(f, "rb") as fh:
            vocab = _PlainUnpickler(fh).load()["vocab_size"]
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
            raise ValueError(f"vocab_size is {vocab!r}")
    except Exception as e:
        raise MstCompileError(f"--data {folder}: cannot read meta.pkl ({type(e).__name__}: {e}); expected a dict with an "
                              "integer vocab_size, as nanoGPT writes; remove the file or fix it") from None
    return vocab


def _raw_ids(path: Path, dtype: np.dtype) -> np.ndarray:
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise MstCompileError(f"--data {path}: its {size} bytes are not a whole number of {dtype.name} token ids "
                              f"({dtype.itemsize} bytes each); pass --data-dtype with the type the ids were written in")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def _npy_ids(path: Path, data_dtype: str | None) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise MstCompileError(f"--data {path}: not a .npy file of token ids ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise MstCompileError(f"--data {path}: token ids must be a 1-D integer array, the file holds {arr.dtype} of shape {arr.shape}")
    if data_dtype is not None and np.dtype(data_dtype) != arr.dtype:
        raise MstCompileError(f"--data-dtype {data_dtype}: {path} holds {arr.dtype} (a .npy file records its type); drop --data-dtype")
    return arr


def token_splits(spec: str, data_dtype: str | None, val_fraction: float) -> tuple[np.ndarray, np.ndarray, int | None, list[Path]]:
    """``(train, val, vocab_size or None, files)`` of a token-id folder or file, memory-mapped."""
    p = Path(spec).expanduser()
    if p.is_dir():
        missing = [n for n in ("train.bin", "val.bin") if not (p / n).is_file()]
        if missing:
            raise MstCompileError(f"--data {p}: a folder of token ids holds train.bin and val.bin; {missing[0]} is missing")
        dtype = np.dtype(data_dtype or "uint16")
        return _raw_ids(p / "train.bin", dtype), _raw_ids(p / "val.bin", dtype), meta_vocab(p), [p / "train.bin", p / "val.bin"]
    ids = _npy_ids(p, data_dtype) if p.suffix.lower() == ".npy" else _raw_ids(p, np.dtype(data_dtype or "uint16"))
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:], meta_vocab(p.parent), [p]


def id_range(arrays, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """``(smallest, largest)`` id of ``arrays``, in chunks (a memmap is read once, never loaded whole)."""
    lo, hi = None, None
    for a in arrays:
        for i in range(0, len(a), chunk):
            part = np.asarray(a[i : i + chunk])
            lo = int(part.min()) if lo is None else min(lo, int(part.min()))
            hi = int(part.max()) if hi is None else max(hi, int(part.max()))
    return None if lo is None else (lo, hi)


# -- records -----------------------------------------------------------------------------------
def datasets_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is None


def need_datasets(spec: str) -> None:
    if datasets_missing():
        raise MstCompileError(f"--data {spec}: records are read with Hugging Face datasets, which is not installed; "
                              "pip install 'mst-compile[data]'")


@contextlib.contextmanager
def _offline(spec: str):
    """``datasets`` with the Hub switched off: local files need no network, and its download-count
    request (made even for local json/csv/parquet files) is skipped."""
    need_datasets(spec)
    import datasets

    cfg = datasets.config
    saved = {k: getattr(cfg, k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS") if hasattr(cfg, k)}
    for k in saved:
        setattr(cfg, k, k != "HF_UPDATE_DOWNLOAD_COUNTS")
    try:
        with tempfile.TemporaryDirectory(prefix="mst-records-") as tmp:  # datasets' lock files, gone afterwards
            yield datasets, tmp
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)


def _text(value, field: str, spec: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise MstCompileError(f"--data {spec}: column {field!r} holds {type(value).__name__} values, not text; pass --text-field NAME of a text column")


def _no_column(spec: str, field: str, columns) -> MstCompileError:
    return MstCompileError(f"--data {spec} has no column {field!r} (columns: {', '.join(map(str, columns))}); pass --text-field NAME")


def _saved_parts(obj, datasets, spec: str) -> list[tuple[object, str | None]]:
    """``(dataset, split)`` of a save_to_disk folder: its train and held-out splits when it has both."""
    if not isinstance(obj, datasets.DatasetDict):
        return [(obj, None)]
    held = next((s for s in VAL_SPLITS if s in obj), None)
    if "train" in obj:
        return [(obj["train"], "train"), (obj[held], "val")] if held else [(obj["train"], None)]
    if len(obj) == 1:
        return [(next(iter(obj.values())), None)]
    raise MstCompileError(f"--data {spec}: the saved DatasetDict has splits {', '.join(obj)} but no 'train'; save the one to train on")


def documents(spec: str, kind: str, text_field: str | None) -> Iterator[tuple[str, str | None]]:
    """``(text, split)`` of every record with text, in order; split is "train"/"val" when the data names it, else None."""
    field = text_field or "text"
    with _offline(spec) as (datasets, tmp):
        try:
            if kind == "saved":
                for part, split in _saved_parts(datasets.load_from_disk(str(Path(spec).expanduser())), datasets, spec):
                    if field not in part.column_names:
                        raise _no_column(spec, field, part.column_names)
                    for batch in part.select_columns([field]).iter(batch_size=1024):
                        yield from ((t, split) for t in batch[field] if _text(t, field, spec) is not None)
                return
            files = matching_files(spec)
            rows = datasets.load_dataset(RECORD_READERS[files[0].suffix.lower()], data_files=[str(f) for f in files],
                                         split="train", streaming=True, cache_dir=tmp)  # read lazily, record by record
            for row in rows:
                if field not in row:
                    raise _no_column(spec, field, row)
                if _text(row[field], field, spec) is not None:
                    yield row[field], None
        except MstCompileError:
            raise
        except Exception as e:  # a malformed file: one line, what datasets said first
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MstCompileError(f"--data {spec}: datasets cannot read it ({type(e).__name__}: {first})") from None
