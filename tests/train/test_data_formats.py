"""--data beyond text: token-id files (nanoGPT folders, .bin, .npy), records read by Hugging Face datasets,
the flags that go with them, and the one-line refusals."""
import importlib.util
import json
import os
import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mst_compile.errors import MstCompileError
from mst_compile.train import data as D
from mst_compile.train import data_formats as F


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))


def _nanogpt(folder: Path, vocab: int = 65, dtype=np.uint16, meta: bool = True) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, vocab, 5000).astype(dtype), rng.integers(0, vocab, 800).astype(dtype)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    if meta:
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": vocab, "itos": {i: chr(65 + i) for i in range(vocab)}}, f)
    return train, val


# -- token ids ---------------------------------------------------------------------------------
def test_nanogpt_folder_is_memory_mapped_and_batched_from_its_own_ids(tmp_path):
    train, val = _nanogpt(tmp_path / "shakespeare")
    _nanogpt(tmp_path / "shakespeare2")
    data = D.load_data(str(tmp_path / "shakespeare"), None, 0.1)
    assert isinstance(data.splits["train"], np.memmap) and isinstance(data.splits["val"], np.memmap)  # not read into memory
    assert np.array_equal(data.splits["train"], train) and np.array_equal(data.splits["val"], val)  # val.bin as it is: no re-split
    assert data.vocab_size == 65 and data.id_range() == (int(min(train.min(), val.min())), int(max(train.max(), val.max())))
    x, y = data.batch("val", (3, 0, 0), 4, 16, seed=1)
    assert x.shape == (4, 16) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    rows = {tuple(val[i : i + 16].tolist()) for i in range(len(val) - 16)}
    assert all(tuple(r.tolist()) in rows for r in x)  # each row a real window of val.bin
    assert torch.equal(x, data.batch("val", (3, 0, 0), 4, 16, seed=1)[0])
    # without meta.pkl the vocabulary is unknown; the id range is still read (and remembered in the cache)
    (tmp_path / "shakespeare" / "meta.pkl").unlink()
    again = D.load_data(str(tmp_path / "shakespeare"), None, 0.1)
    assert again.vocab_size is None and again.id_range() == data.id_range()
    assert len(list((tmp_path / "cache" / "id-ranges").iterdir())) == 1
    # uint16 ids read as uint32 pair up into ids far past meta.pkl's vocabulary: refused, naming the flag
    with pytest.raises(MstCompileError, match="beyond meta.pkl's vocab_size 65 with the ids read as uint32; pass --data-dtype"):
        D.load_data(str(tmp_path / "shakespeare2"), None, 0.1, data_dtype="uint32")


def test_single_token_files_hold_out_their_tail(tmp_path):
    ids = (np.arange(3000) * 7919 % 70000).astype(np.uint32)
    ids.tofile(tmp_path / "ids.bin")
    data = D.load_data(str(tmp_path / "ids.bin"), None, 0.1, data_dtype="uint32")
    assert np.array_equal(data.splits["train"], ids[:2700]) and np.array_equal(data.splits["val"], ids[2700:])
    assert data.id_range() == (0, int(ids.max())) and "read as uint32 ids" in data.origin()
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    data = D.load_data(str(tmp_path / "ids.npy"), None, 0.2)
    assert data.splits["train"].dtype == np.int32 and np.array_equal(data.splits["val"], ids[2400:])
    # the same bytes as uint16 are other ids: nothing guesses, the flag says
    assert len(D.load_data(str(tmp_path / "ids.bin"), None, 0.1).splits["train"]) == 5400


def test_token_files_refused_in_one_line(tmp_path):
    (tmp_path / "odd.bin").write_bytes(bytes(101))
    cases = [
        (str(tmp_path / "odd.bin"), {}, "its 101 bytes are not a whole number of uint16 token ids"),
        (str(tmp_path / "odd.bin"), {"data_dtype": "int32"}, "not a whole number of int32 token ids (4 bytes each); pass --data-dtype"),
    ]
    np.save(tmp_path / "two_d.npy", np.zeros((3, 3), np.int64))
    np.save(tmp_path / "floats.npy", np.zeros(30))
    np.save(tmp_path / "ok.npy", np.zeros(30, np.int64))
    cases += [(str(tmp_path / "two_d.npy"), {}, "1-D integer array, the file holds int64 of shape (3, 3)"),
              (str(tmp_path / "floats.npy"), {}, "1-D integer array, the file holds float64"),
              (str(tmp_path / "ok.npy"), {"data_dtype": "uint16"}, "holds int64 (a .npy file records its type); drop --data-dtype")]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes(bytes(100))
    cases.append((str(tmp_path / "half"), {}, "a folder of token ids holds train.bin and val.bin; val.bin is missing"))
    _nanogpt(tmp_path / "evil", meta=False)
    with open(tmp_path / "evil" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "hook": os.getcwd}, f)  # a pickle that names a function: never imported
    cases.append((str(tmp_path / "evil"), {}, "cannot read meta.pkl (UnpicklingError: it refers to posix.getcwd"))
    for spec, options, expected in cases:
        with pytest.raises(MstCompileError) as e:
            D.load_data(spec, None, 0.1, **options)
        assert expected in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))


def test_flags_that_the_data_would_ignore_are_refused(tmp_path):
    _nanogpt(tmp_path / "ng")
    (tmp_path / "a.txt").write_text("plain text\n" * 50)
    for spec, options, expected in [
        (str(tmp_path / "a.txt"), {"data_dtype": "uint32"}, "--data-dtype uint32 is for token-id files"),
        (None, {"data_dtype": "uint32"}, "the built-in corpus is text"),
        (str(tmp_path / "a.txt"), {"text_field": "body"}, "--text-field body is for records"),
        (str(tmp_path / "ng"), {"text_field": "body"}, f"--data {tmp_path / 'ng'} is token ids"),
        (str(tmp_path / "ng"), {"tokenizer": "tok"}, "holds token ids already; drop --tokenizer"),
    ]:
        tokenizer = options.pop("tokenizer", None)
        with pytest.raises(MstCompileError) as e:
            D.load_data(spec, tokenizer, 0.1, **options)
        assert expected in str(e.value), str(e.value)
        with pytest.raises(MstCompileError):  # the CLI's check before torch says the same
            D.check_data(spec, tokenizer, 0.1, **options)


def test_a_refused_format_names_what_reads_it(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 10)
    for spec in (tmp_path / "pics", tmp_path / "blob.dat"):
        with pytest.raises(MstCompileError) as e:
            D.load_data(str(spec), None, 0.1)
        msg = str(e.value)
        assert "train.bin and val.bin" in msg and ".jsonl" in msg and "data() in the model file" in msg and "\n" not in msg


# -- records -------------------------------------------------------------------------------------
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the data extra (datasets)")
RECORDS = [{"text": f"record {i}: " + "abcdefghij"[i % 10] * (20 + i), "n": i, "title": f"t{i}"} for i in range(40)]


def _write(folder: Path, kind: str, records=RECORDS) -> Path:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"docs.{kind}"
    if kind == "jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        f.write_text(json.dumps(records))
    elif kind == "parquet":
        pd.DataFrame(records).to_parquet(f)
    elif kind == "csv":
        pd.DataFrame(records).to_csv(f, index=False)
    return f


def _docs(data) -> tuple[bytes, bytes]:
    return bytes(np.asarray(data.splits["train"])), bytes(np.asarray(data.splits["val"]))


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
@needs_datasets
def test_records_are_documents_of_their_text_column(tmp_path, kind):
    f = _write(tmp_path, kind)
    train, val = _docs(D.load_data(str(f), None, 0.2))
    docs = [(r["text"] + "\n").encode() for r in RECORDS]
    # every record's text, whole, in one split, in order; nothing of the other columns or the syntax
    in_val = [d for d in docs if d in val]
    assert 0 < len(in_val) < len(docs)
    assert train == b"".join(d for d in docs if d not in in_val) and val == b"".join(in_val)
    assert b'"' not in train + val and b"title" not in train + val
    titles = b"".join(_docs(D.load_data(str(f), None, 0.2, text_field="title")))
    assert sorted(titles.split()) == sorted(f"t{i}".encode() for i in range(40))


@needs_datasets
def test_every_record_format_gives_the_same_tokens(tmp_path):
    import datasets

    got = {kind: _docs(D.load_data(str(_write(tmp_path / kind, kind)), None, 0.2)) for kind in ("jsonl", "json", "parquet", "csv")}
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    got["saved"] = _docs(D.load_data(str(tmp_path / "saved"), None, 0.2))
    shards = tmp_path / "shards"  # a folder and a glob of shards: the records of all files, in order
    _write(shards / "a", "jsonl", RECORDS[:25])
    _write(shards / "b", "jsonl", RECORDS[25:])
    got["folder"] = _docs(D.load_data(str(shards), None, 0.2))
    got["glob"] = _docs(D.load_data(str(shards / "*" / "*.jsonl"), None, 0.2))
    assert all(v == got["jsonl"] for v in got.values()), {k for k, v in got.items() if v != got["jsonl"]}


@needs_datasets
def test_a_saved_dataset_dict_keeps_its_own_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:30]), "validation": datasets.Dataset.from_list(RECORDS[30:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, val = _docs(D.load_data(str(tmp_path / "dd"), None, 0.2))
    assert train == b"".join((r["text"] + "\n").encode() for r in RECORDS[:30])
    assert val == b"".join((r["text"] + "\n").encode() for r in RECORDS[30:])


@needs_datasets
def test_records_with_a_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "tok")
    f = _write(tmp_path, "jsonl", [{"text": "hello world"}, {"text": "world other"}] * 10)
    data = D.load_data(str(f), str(tmp_path / "tok"), 0.2)
    both = np.concatenate([np.asarray(data.splits["train"]), np.asarray(data.splits["val"])])
    assert sorted(both.tolist()) == sorted([1, 2, 3, 2, 0, 3] * 10)  # each record ends with the tokenizer's EOS
    assert data.vocab_size == 4 and data.id_range() == (0, 3) and "tokenized by hf:" in data.origin()


@needs_datasets
def test_records_refused_in_one_line(tmp_path):
    f = _write(tmp_path, "jsonl")
    with pytest.raises(MstCompileError, match=r"has no column 'body' \(columns: text, n, title\); pass --text-field NAME"):
        D.load_data(str(f), None, 0.2, text_field="body")
    with pytest.raises(MstCompileError, match="column 'n' holds int values, not text"):
        D.load_data(str(f), None, 0.2, text_field="n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(MstCompileError, match=r"--data .*bad.jsonl: datasets cannot read it \(") as e:
        D.load_data(str(tmp_path / "bad.jsonl"), None, 0.2)
    assert "\n" not in str(e.value)


def test_records_without_datasets_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    for call in (D.load_data, D.check_data):
        with pytest.raises(MstCompileError, match=r"records are read with Hugging Face datasets, which is not installed; pip install 'mst-compile\[data\]'"):
            call(str(tmp_path / "docs.jsonl"), None, 0.2)


@needs_datasets
def test_records_never_touch_the_network(tmp_path, monkeypatch):
    import datasets

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    before = datasets.config.HF_HUB_OFFLINE
    for kind in ("jsonl", "parquet", "csv"):
        D.load_data(str(_write(tmp_path / kind, kind)), None, 0.2)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    D.load_data(str(tmp_path / "saved"), None, 0.2)
    assert calls == [] and datasets.config.HF_HUB_OFFLINE == before  # the switch is undone afterwards


def test_text_folders_with_some_json_stay_text(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hi')\n" * 20)
    (tmp_path / "src" / "package.json").write_text('{"name": "x"}\n')
    assert F.kind_of(str(tmp_path / "src")) == "text" and F.kind_of(str(tmp_path / "src" / "*.py")) == "text"
    assert F.kind_of(str(tmp_path / "src" / "*.json")) == "records"
    data = D.load_data(str(tmp_path / "src"), None, 0.2)
    assert b'{"name": "x"}' in b"".join(_docs(data))
