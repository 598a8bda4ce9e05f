"""train/metrics.py (the progress display has tests/train/test_metrics_progress.py): metrics.jsonl as
written and read back, a line cut by a crash, NaN written as null, a resume dropping the steps it redoes."""
import json

from mst_compile.train.metrics import MetricsLog, duration, read_jsonl


def test_records_round_trip_and_nan_becomes_null(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"kind": "train", "step": 1, "loss": 2.5, "flops": [1.0, float("inf")]})
    log.write({"kind": "eval", "step": 2, "val": {"loss": float("nan")}})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"kind": "train", "step": 1, "loss": 2.5, "flops": [1.0, None]},
                                               {"kind": "eval", "step": 2, "val": {"loss": None}}]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [json.loads(x) for x in lines]


def test_read_stops_at_a_cut_line_and_a_missing_file_is_empty(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert read_jsonl(p) == []
    p.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]


def test_a_resume_keeps_the_lines_up_to_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for s in (1, 2, 3, 4):
        log.write({"kind": "train", "step": s})
    log.close()
    again = MetricsLog(tmp_path, keep_until_step=2)  # lines past step 2 are redone by the resumed run
    again.write({"kind": "train", "step": 3, "resumed": True})
    again.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"kind": "train", "step": 1}, {"kind": "train", "step": 2},
                                                      {"kind": "train", "step": 3, "resumed": True}]


def test_duration():
    assert duration(4.26) == "4.3s" and duration(59.4) == "59.4s" and duration(61) == "1m01s" and duration(3600) == "60m00s"
