import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mst_compile.errors import MstCompileError
from mst_compile.train import data as D


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))


def _corpus(folder: Path, n: int = 30) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n):
        raw = (f"file {i}: " + "abcdefghij"[i % 10] * (50 + i) + "\n").encode()
        (folder / f"f{i:02d}.txt").write_bytes(raw)
        texts[f"f{i:02d}.txt"] = raw
    return texts


def test_stdlib_files_are_python_sources_without_site_packages():
    files = D.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500
    assert all(f.suffix == ".py" and f.is_relative_to(root) for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)
    assert root / "os.py" in files


def test_folder_tokens_are_the_files_bytes_split_by_file(tmp_path):
    texts = _corpus(tmp_path / "docs")
    (tmp_path / "docs" / "blob.bin").write_bytes(b"\x00\x01binary")  # skipped: not text
    (tmp_path / "docs" / ".hidden").write_text("never read")
    data = D.load_data(str(tmp_path / "docs"), None, 0.2)
    train = bytes(np.asarray(data.splits["train"]))
    val = bytes(np.asarray(data.splits["val"]))
    # every file lands whole in exactly one split, in sorted order; nothing else is added
    in_val = [n for n in sorted(texts) if texts[n] in val]
    assert 0 < len(in_val) < len(texts)
    assert train == b"".join(texts[n] for n in sorted(texts) if n not in in_val)
    assert val == b"".join(texts[n] for n in in_val)
    assert data.vocab_size == 256 and data.splits["train"].dtype == np.uint8
    # deterministic: the same split again (from the cache) and with a fresh cache
    again = D.load_data(str(tmp_path / "docs"), None, 0.2)
    assert bytes(np.asarray(again.splits["val"])) == val


def test_cache_is_reused_and_follows_changes(tmp_path):
    _corpus(tmp_path / "docs")
    D.load_data(str(tmp_path / "docs"), None, 0.2)
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"train.bin", "val.bin", "meta.json"}
    stamp = (folders[0] / "train.bin").stat().st_mtime_ns
    D.load_data(str(tmp_path / "docs"), None, 0.2)
    assert (folders[0] / "train.bin").stat().st_mtime_ns == stamp
    (tmp_path / "docs" / "f00.txt").write_text("changed and longer than before\n")
    D.load_data(str(tmp_path / "docs"), None, 0.2)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cache_key_follows_links_to_the_real_files(tmp_path):
    """The same files reached through a linked folder share a cache; a linked file counts as its target."""
    _corpus(tmp_path / "docs")
    (tmp_path / "via").symlink_to(tmp_path / "docs")
    files = sorted((tmp_path / "docs").glob("*.txt"))
    linked = [tmp_path / "via" / f.name for f in files]
    assert D._cache_folder("x", "h", linked) == D._cache_folder("x", "h", files)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").symlink_to(files[0])
    assert D._cache_folder("x", "h", [tmp_path / "other" / "a.txt"]) == D._cache_folder("x", "h", [files[0]])
    assert D._cache_folder("x", "h", [files[1]]) != D._cache_folder("x", "h", [files[0]])


def test_single_file_and_glob_fall_back_to_a_tail_split(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(32, 127)) * 20)
    data = D.load_data(str(f), None, 0.1)
    whole = f.read_bytes() + b"\n"
    n_val = int(len(whole) * 0.1)
    assert bytes(np.asarray(data.splits["val"])) == whole[-n_val:]
    assert bytes(np.asarray(data.splits["train"])) == whole[:-n_val]
    _corpus(tmp_path / "g", 5)
    globbed, skipped = D.data_files(str(tmp_path / "g" / "f0[0-2].txt"))
    assert [p.name for p in globbed] == ["f00.txt", "f01.txt", "f02.txt"] and skipped == 0


def _binaries(folder: Path) -> list[Path]:
    """Files that are not text: random bytes, a NUL-padded blob, UTF-16 text."""
    rng = np.random.default_rng(0)
    made = {"noise.dat": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
            "zeros.raw": b"header" + bytes(3000),  # (.bin and .npy are token ids)
            "utf16.txt": ("hello world " * 200).encode("utf-16")}
    for name, raw in made.items():
        (folder / name).write_bytes(raw)
    return [folder / n for n in made]


def test_a_non_text_file_is_refused_naming_it(tmp_path):
    for f in _binaries(tmp_path):
        with pytest.raises(MstCompileError) as e:
            D.load_data(str(f), None, 0.1)
        assert f"--data {f}: not a text file" in str(e.value) and "\n" not in str(e.value)
    # text with a few bytes of another encoding (Latin-1 accents) and real multi-byte UTF-8 is text
    (tmp_path / "latin1.txt").write_bytes(("caf\u00e9 na\u00efve " * 10 + "plain ascii " * 300).encode("latin-1"))
    (tmp_path / "utf8.txt").write_text("\u00fcber \u65e5\u672c\u8a9e \u2603 " * 300, encoding="utf-8")
    for name in ("latin1.txt", "utf8.txt"):
        assert D.data_files(str(tmp_path / name)) == ([tmp_path / name], 0)


def test_a_folder_skips_non_text_files_and_says_how_many(tmp_path):
    texts = _corpus(tmp_path / "docs", 10)
    _binaries(tmp_path / "docs")
    files, skipped = D.data_files(str(tmp_path / "docs"))
    assert sorted(f.name for f in files) == sorted(texts) and skipped == 3
    data = D.load_data(str(tmp_path / "docs"), None, 0.2)
    assert data.describe().endswith("(3 non-text files skipped)")
    assert len(data.splits["train"]) + len(data.splits["val"]) == sum(len(t) for t in texts.values())
    only = tmp_path / "only"
    only.mkdir()
    _binaries(only)
    with pytest.raises(MstCompileError, match=r"no text files found there \(3 non-text files skipped\)"):
        D.data_files(str(only))
    with pytest.raises(MstCompileError, match="3 non-text files skipped"):
        D.data_files(str(only / "*"))


def test_batches_are_deterministic_slices_shifted_by_one(tmp_path):
    _corpus(tmp_path / "docs")
    data = D.load_data(str(tmp_path / "docs"), None, 0.2)
    x, y = data.batch("train", (7, 0, 0), 4, 16, seed=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    arr = np.asarray(data.splits["train"])
    for row in x:  # each row is a real window of the train split
        r = bytes(row.tolist())
        assert r in bytes(arr)
    x2, _ = data.batch("train", (7, 0, 0), 4, 16, seed=3)
    x3, _ = data.batch("train", (8, 0, 0), 4, 16, seed=3)
    x4, _ = data.batch("train", (7, 0, 1), 4, 16, seed=3)  # another rank
    assert torch.equal(x, x2) and not torch.equal(x, x3) and not torch.equal(x, x4)


def test_bad_data_is_one_readable_error(tmp_path):
    with pytest.raises(MstCompileError, match="no such file or folder"):
        D.load_data(str(tmp_path / "missing"), None, 0.1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MstCompileError, match="no text files"):
        D.load_data(str(tmp_path / "empty"), None, 0.1)
    (tmp_path / "zero.txt").write_text("")
    with pytest.raises(MstCompileError, match="is empty"):
        D.load_data(str(tmp_path / "zero.txt"), None, 0.1)
    f = tmp_path / "short.txt"
    f.write_text("x" * 200)
    data = D.load_data(str(f), None, 0.1)
    with pytest.raises(MstCompileError, match=r"block size 64 is larger than the data: the val split .* has 20 tokens"):
        data.check(64)
    data.check(16)


def test_hook_data_forms():
    ids = np.arange(1000) % 50
    d = D.from_hook(ids, "m.py: data()", 0.1, None)
    assert len(d.splits["val"]) == 100 and d.vocab_size == 50
    d = D.from_hook({"train": torch.arange(300), "val": torch.arange(100)}, "m.py: data()", 0.1, None)
    assert d.vocab_size == 300 and len(d.splits["train"]) == 300
    with pytest.raises(MstCompileError, match="exactly 'train' and 'val'"):
        D.from_hook({"train": ids}, "m.py: data()", 0.1, None)
    with pytest.raises(MstCompileError, match="1-D array of integer token ids"):
        D.from_hook(np.zeros((3, 3)), "m.py: data()", 0.1, None)
    calls = []

    def get_batch(split, index):
        calls.append((split, index))
        g = torch.Generator().manual_seed(index % 2**31)
        return torch.randint(0, 9, (2, 9), generator=g)  # (B, T+1)

    h = D.from_hook(get_batch, "m.py: data()", 0.1, None)
    x, y = h.batch("train", (5, 0, 0), 2, 8, 0)
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = h.batch("train", (5, 0, 0), 2, 8, 0)
    assert torch.equal(x, x2) and calls[0] == calls[1] and calls[0][0] == "train"


def test_local_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "tok")
    f = tmp_path / "t.txt"
    f.write_text("hello world hello other\n" * 10)
    data = D.load_data(str(f), str(tmp_path / "tok"), 0.1)
    allt = np.concatenate([np.asarray(data.splits["train"]), np.asarray(data.splits["val"])])
    assert data.vocab_size == 4
    assert allt.tolist() == [1, 2, 1, 0] * 10 + [3]
    with pytest.raises(MstCompileError, match="not a folder"):
        D.load_data(str(f), str(tmp_path / "nope"), 0.1)


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MST_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.cache_dir() == tmp_path / "mst_compile"
    assert os.fspath(D.cache_dir()).endswith("mst_compile")
