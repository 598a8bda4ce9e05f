"""Training data: token files on disk, memory-mapped, and batches that depend only on (seed, step).

``--data`` takes text, token ids or records (``data_formats.py`` tells them apart and reads the last
two). The default corpus is the Python standard library's own source (found via ``sysconfig``, without
site-packages), so ``mstc train`` runs with nothing to download. Text is tokenized once into
``train.bin`` / ``val.bin`` under a cache folder keyed by the files' names, sizes and mtimes; later
runs memory-map those files, so reading a batch is a few slices and never stalls a step.

A batch is drawn from a generator seeded by ``(seed, split, step, micro-batch, rank)``, not from a
running stream: resuming at step k reads exactly the batches an uninterrupted run reads.

torch is imported where batches are made, so ``mstc train`` checks ``--data`` before loading it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MstCompileError
from .data_formats import FORMS, check_flags, documents, id_range, kind_of, matching_files, need_datasets, token_splits

_SPLITS = {"train": 0, "val": 1}


def cache_dir() -> Path:
    """``$MST_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/mst_compile``, else ``~/.cache/mst_compile``."""
    if os.environ.get("MST_COMPILE_CACHE"):
        return Path(os.environ["MST_COMPILE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mst_compile"


# -- which files -----------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library, site-packages and dist-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        out += [Path(d) / f for f in sorted(files) if f.endswith(".py")]
    return out


_SAMPLE = 1 << 16  # bytes read to judge a file
_MAX_BAD = 0.05  # share of NUL or invalid UTF-8 bytes above which a file is not text


def non_text_share(path: Path) -> float:
    """Share of NUL bytes and bytes of invalid UTF-8 sequences in the first 64 KiB of ``path``."""
    with open(path, "rb") as f:
        sample = f.read(_SAMPLE)
    if not sample:
        return 0.0
    text = sample.decode("utf-8", errors="replace")
    # one U+FFFD per invalid byte (a character cut by the sample's end counts at most 3)
    return (sample.count(0) + text.count("\ufffd") - sample.count("\ufffd".encode())) / len(sample)


def data_files(spec: str) -> tuple[list[Path], int]:
    """``(files, skipped)``: a text file, or the text files of a folder (hidden ones left out) or glob.

    A file given by name that is not text is refused; a folder or glob skips such files and counts them.
    """
    p = Path(spec).expanduser()
    if p.is_file():
        bad = non_text_share(p)
        if bad > _MAX_BAD:
            raise MstCompileError(f"--data {p}: not a text file ({bad:.0%} of its first bytes are NUL or invalid UTF-8); {FORMS}")
        return [p], 0
    found = matching_files(spec)
    files = [f for f in found if non_text_share(f) <= _MAX_BAD]
    if not files:
        skipped = f" ({len(found)} non-text files skipped)" if found else ""
        raise MstCompileError(f"--data {spec}: no text files found there{skipped}; {FORMS}")
    return files, len(found) - len(files)


def check_data(spec: str | None, tokenizer: str | None, val_fraction: float, *, data_dtype: str | None = None,
               text_field: str | None = None) -> str:
    """What can be checked of the data without reading it (numpy only: before torch loads); its kind."""
    kind = "text" if spec is None else kind_of(spec)
    check_flags(spec, kind, tokenizer, data_dtype, text_field)
    if kind == "text" and spec is not None:
        data_files(spec)
    elif kind == "tokens":
        token_splits(spec, data_dtype, val_fraction)
    elif kind in ("records", "saved"):
        need_datasets(spec)
    return kind


# -- tokenizing into a cache -----------------------------------------------------------------
class _Bytes:
    vocab_size = 256
    name = "bytes"

    def encode(self, raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.uint8)


class _HFTokenizer:
    def __init__(self, folder: str):
        p = Path(folder)
        if not p.is_dir():
            raise MstCompileError(f"--tokenizer {folder}: not a folder (expected a local Hugging Face tokenizer folder)")
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # any loading failure is one line
            raise MstCompileError(f"--tokenizer {folder}: cannot load a tokenizer there ({type(e).__name__}: {e})") from None
        self.vocab_size = len(self.tok)
        self.name = f"hf:{p.resolve()}"

    def encode(self, raw: bytes) -> np.ndarray:
        ids = self.tok(raw.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if self.tok.eos_token_id is not None:
            ids.append(self.tok.eos_token_id)  # a document boundary the model can learn
        return np.asarray(ids, dtype=np.int64)


def _dtype_for(vocab: int):
    return np.uint8 if vocab <= 256 else np.uint16 if vocab <= 65536 else np.uint32


def _hashed_val(key: str, val_fraction: float) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def _is_val(path: Path, root: Path | None, val_fraction: float) -> bool:
    """Deterministic file-level split: a stable hash of the relative path picks the val files."""
    rel = str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name
    return _hashed_val(rel, val_fraction)


def _cache_folder(source: str, header: str, files: list[Path]) -> Path:
    """``<cache>/<name>-<key>``: the key hashes how the files are tokenized and their names, sizes and dates."""
    h = hashlib.sha1(header.encode())
    folders: dict[Path, str] = {}  # each folder resolved once: Path.resolve per file was most of a small run's setup
    for f in files:
        st = f.stat()
        if f.parent not in folders:
            folders[f.parent] = os.path.realpath(f.parent)
        real = f.resolve() if f.is_symlink() else Path(folders[f.parent]) / f.name
        h.update(f"{real}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    name = "stdlib" if source == "stdlib" else Path(source.rstrip("/*")).name or "data"
    return cache_dir() / f"{name}-{h.hexdigest()[:16]}"


def build_token_files(files: list[Path], tokenizer, val_fraction: float, source: str, root: Path | None = None) -> Path:
    """Tokenize ``files`` once into ``<cache>/<key>/{train,val}.bin``; return that folder."""
    folder = _cache_folder(source, f"{tokenizer.name}|{val_fraction}", files)
    docs = ((f.read_bytes(), "val" if _is_val(f, root, val_fraction) else "train") for f in files)  # read lazily
    return _tokenize_once(folder, docs, tokenizer, val_fraction, source, len(files))


def build_record_tokens(spec: str, kind: str, tokenizer, val_fraction: float, text_field: str | None) -> Path:
    """Tokenize the records of ``spec`` once, each record's text a document, like build_token_files a file.

    A saved DatasetDict's own train/held-out splits are kept; otherwise a stable hash of the record's
    index picks the val records."""
    files = matching_files(spec)
    folder = _cache_folder(spec, f"{tokenizer.name}|{val_fraction}|records:{text_field or 'text'}", files)
    docs = ((text.encode(), split or ("val" if _hashed_val(f"record {i}", val_fraction) else "train"))
            for i, (text, split) in enumerate(documents(spec, kind, text_field)))
    return _tokenize_once(folder, docs, tokenizer, val_fraction, spec, len(files))


def _tokenize_once(folder: Path, docs, tokenizer, val_fraction: float, source: str, n_files: int) -> Path:
    """Write ``folder`` from ``(raw bytes, split)`` documents unless it exists; a document gets a final newline."""
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    dtype = _dtype_for(tokenizer.vocab_size)
    counts = {"train": 0, "val": 0}
    lo, hi = None, None  # the smallest and largest id written: the vocabulary check reads them
    try:
        with open(tmp / "train.bin", "wb") as tr, open(tmp / "val.bin", "wb") as va:
            for raw, split in docs:
                if not raw:
                    continue
                ids = tokenizer.encode(raw + (b"\n" if not raw.endswith(b"\n") else b"")).astype(dtype)
                (va if split == "val" else tr).write(ids.tobytes())
                counts[split] += len(ids)
                if len(ids):
                    lo = int(ids.min()) if lo is None else min(lo, int(ids.min()))
                    hi = int(ids.max()) if hi is None else max(hi, int(ids.max()))
        if counts["train"] == 0 or counts["val"] == 0:  # too few files for a file split: hold out the tail
            _tail_split(tmp, dtype, val_fraction, counts)
        meta = {"source": source, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                "dtype": np.dtype(dtype).name, "files": n_files, **{f"{k}_tokens": v for k, v in counts.items()},
                "min_id": lo, "max_id": hi}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)  # atomic; another process may have finished first, which is fine
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _tail_split(folder: Path, dtype, val_fraction: float, counts: dict) -> None:
    all_ids = np.concatenate([np.fromfile(folder / "train.bin", dtype=dtype), np.fromfile(folder / "val.bin", dtype=dtype)])
    n_val = int(len(all_ids) * val_fraction)
    all_ids[: len(all_ids) - n_val].tofile(folder / "train.bin")
    all_ids[len(all_ids) - n_val:].tofile(folder / "val.bin")
    counts.update(train=len(all_ids) - n_val, val=n_val)


# -- batches ---------------------------------------------------------------------------------
class TokenData:
    """Train and val token arrays (memory-mapped or in memory) and deterministic random batches."""

    def __init__(self, train: np.ndarray, val: np.ndarray, vocab_size: int | None, source: str, *, tokenizer: str | None = None,
                 ids: tuple[int, int] | None = None, files: list[Path] | None = None):
        self.splits = {"train": train, "val": val}
        self.vocab_size = vocab_size
        self.source = source
        self.tokenizer = tokenizer  # what made the ids ("bytes", "hf:<folder>"); None: token ids read as given
        self.skipped = 0  # non-text files of the folder or glob that were left out
        self._ids = ids  # (smallest, largest) token id, when known
        self._files = files  # token-id files: their id range is remembered in the cache

    @classmethod
    def from_folder(cls, folder: Path) -> TokenData:
        meta = json.loads((folder / "meta.json").read_text())
        arrs = {}
        for s in ("train", "val"):
            n = meta[f"{s}_tokens"]
            arrs[s] = np.memmap(folder / f"{s}.bin", dtype=meta["dtype"], mode="r") if n else np.zeros(0, np.uint8)
        ids = (meta["min_id"], meta["max_id"]) if meta.get("max_id") is not None else None  # older caches: scanned
        return cls(arrs["train"], arrs["val"], meta["vocab_size"], meta["source"], tokenizer=meta["tokenizer"], ids=ids)

    def origin(self) -> str:
        """Where the ids come from, for messages: the data, and the tokenizer that made them."""
        if self.tokenizer:
            return f"{self.source}, tokenized by {self.tokenizer}"
        return f"{self.source}, read as {self.splits['train'].dtype} ids" if self._files else self.source

    def id_range(self) -> tuple[int, int] | None:
        """``(smallest, largest)`` token id of both splits; None when there are none."""
        if self._ids is None:
            self._ids = _remembered_range(self._files, self.splits["train"].dtype, lambda: id_range(self.splits.values()))
        return self._ids

    def describe(self) -> str:
        skipped = f" ({self.skipped} non-text file{'s' if self.skipped > 1 else ''} skipped)" if self.skipped else ""
        return f"{self.source}: {len(self.splits['train']):,} train / {len(self.splits['val']):,} val tokens{skipped}"

    def check(self, block_size: int) -> None:
        for split, arr in self.splits.items():
            if len(arr) == 0:
                raise MstCompileError(f"the data ({self.source}) is empty: its {split} split has no tokens")
            if len(arr) <= block_size:
                raise MstCompileError(
                    f"block size {block_size} is larger than the data: the {split} split of {self.source} has "
                    f"{len(arr)} tokens; use --block-size {max(1, len(arr) - 1)} or less, or more data"
                )

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int, seed: int):
        """``(x, y)`` int64 tensors of shape (B, T); y is x shifted by one token."""
        arr = self.splits[split]
        rng = np.random.default_rng([seed, _SPLITS[split], *key])
        starts = rng.integers(0, len(arr) - block_size, size=batch_size)
        chunk = np.stack([arr[i : i + block_size + 1] for i in starts]).astype(np.int64)  # (B, T+1)
        import torch

        t = torch.from_numpy(chunk)
        return t[:, :-1], t[:, 1:]  # (B, T), (B, T)


class HookData:
    """Batches from a model file's ``data()`` hook returning ``get_batch(split, index)``."""

    def __init__(self, fn: Callable, source: str):
        self.fn, self.source, self.vocab_size = fn, source, None

    def describe(self) -> str:
        return f"{self.source}: batches from get_batch(split, index)"

    def origin(self) -> str:
        return self.source

    def id_range(self) -> None:
        return None  # unknown before the batches are drawn

    def check(self, block_size: int) -> None:
        pass

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int, seed: int):
        import torch

        index = int(np.random.default_rng([seed, _SPLITS[split], *key]).integers(0, 2**62))
        try:
            out = self.fn(split, index)
        except Exception as e:
            raise MstCompileError(f"{self.source}: get_batch({split!r}, {index}) raised {type(e).__name__}: {e}") from e
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return torch.as_tensor(out[0]).long(), torch.as_tensor(out[1]).long()
        x = torch.as_tensor(out).long()
        if x.dim() != 2 or x.size(1) < 2:
            raise MstCompileError(f"{self.source}: get_batch must return (x, y) or a (B, T+1) token tensor, got shape {tuple(x.shape)}")
        return x[:, :-1], x[:, 1:]


def _as_tokens(obj: Any, what: str) -> np.ndarray:
    arr = obj.detach().cpu().numpy() if hasattr(obj, "detach") else np.asarray(obj)  # a torch.Tensor
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise MstCompileError(f"{what} must be a 1-D array of integer token ids, got {arr.dtype} with shape {arr.shape}")
    return arr


def from_hook(value: Any, source: str, val_fraction: float, tokenizer: str | None, **data_options):
    """Turn what ``data()`` returned into a data object.

    Accepted: a path/glob (like ``--data``, any of its forms; ``data_options``: ``data_dtype``,
    ``text_field``); a 1-D token array (a ``np.memmap`` too; the tail is held out); a dict
    ``{"train": tokens, "val": tokens}``; or a function ``get_batch(split, index)``.
    """
    if isinstance(value, (str, os.PathLike)):
        return load_data(str(value), tokenizer, val_fraction, **data_options)
    if callable(value):
        return HookData(value, source)
    if isinstance(value, dict):
        if set(value) != {"train", "val"}:
            raise MstCompileError(f"{source} returned a dict with keys {sorted(value)}; expected exactly 'train' and 'val'")
        tr, va = (_as_tokens(value[s], f"{source}['{s}']") for s in ("train", "val"))
    else:
        ids = _as_tokens(value, source)
        n_val = int(len(ids) * val_fraction)
        tr, va = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    ids = id_range([tr, va])
    return TokenData(tr, va, ids[1] + 1 if ids else None, source, ids=ids)


def _remembered_range(files: list[Path] | None, dtype, scan: Callable) -> tuple[int, int] | None:
    """``scan()``, remembered in the cache for token-id ``files`` that have not changed since (a large
    file takes seconds to scan, once)."""
    if not files:
        return scan()
    h = hashlib.sha1(np.dtype(dtype).name.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    memo = cache_dir() / "id-ranges" / f"{h.hexdigest()[:16]}.json"
    if memo.is_file():
        return tuple(json.loads(memo.read_text()))
    ids = scan()
    if ids is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(list(ids)))
        os.replace(tmp, memo)
    return ids


def load_data(spec: str | None, tokenizer: str | None, val_fraction: float, *, data_dtype: str | None = None,
              text_field: str | None = None):
    """The corpus a run trains on (``spec`` None: the standard library). Text and records are tokenized
    with ``tokenizer`` (a local Hugging Face tokenizer folder), else as bytes; token ids are read as stored."""
    kind = "text" if spec is None else kind_of(spec)
    check_flags(spec, kind, tokenizer, data_dtype, text_field)
    if kind == "tokens":
        train, val, vocab, files = token_splits(spec, data_dtype, val_fraction)
        data = TokenData(train, val, vocab, spec, files=files)
        ids = data.id_range() if vocab else None
        if ids and ids[1] >= vocab:  # most likely ids written in another type than they are read in
            raise MstCompileError(f"--data {spec}: its largest token id {ids[1]} is beyond meta.pkl's vocab_size {vocab} with the ids "
                                  f"read as {train.dtype}; pass --data-dtype with the type they were written in")
        return data
    tok = _HFTokenizer(tokenizer) if tokenizer else _Bytes()
    if kind != "text":
        return TokenData.from_folder(build_record_tokens(spec, kind, tok, val_fraction, text_field))
    skipped = 0
    if spec is None:
        files, source, root = stdlib_files(), "stdlib", Path(sysconfig.get_paths()["stdlib"])
    else:
        (files, skipped), source = data_files(spec), spec
        root = Path(spec) if Path(spec).is_dir() else None
    if sum(f.stat().st_size for f in files) == 0:
        raise MstCompileError(f"the data {source} is empty: its {len(files)} file(s) hold no text")
    data = TokenData.from_folder(build_token_files(files, tok, val_fraction, source, root))
    data.skipped = skipped
    return data
