"""regime.py: the expected gap read off a regime map's power law (a·x^-b by hand), whether it is
extrapolated, and the start-of-run note, on a map written here and on the one the package ships."""
import pytest

from mst_compile import MSTConfig, regime

MAP = {"source": "test", "corpus": "test", "measured_range": [10.0, 1000.0], "configs": {
    "default": {"fit": {"a": 50.0, "b": 0.5}, "within_5pct_at": 100.0,
                "points": [{"tokens_per_param": 10.0, "gap_pct": 15.8, "reduction": 2.0},
                           {"tokens_per_param": 1000.0, "gap_pct": 1.6, "reduction": 2.5}],
                "vs_dense_avg": [{"tokens_per_param": 10.0, "dense_avg_params": 2500, "dense_avg_reduction": 2.1,
                                  "gaps_pct": [4.0, 5.5, 3.5], "verdict": "above"},
                                 {"tokens_per_param": 100.0, "dense_avg_params": 900, "dense_avg_reduction": 2.4,
                                  "gaps_pct": [-1.0, 0.5], "verdict": "mixed"}]},
    "paper": {"fit": None, "within_5pct_at": None, "points": []}}}


@pytest.fixture
def fake_map(monkeypatch):
    monkeypatch.setattr(regime, "regime_map", lambda: MAP)


def test_expected_gap_follows_the_fit(fake_map):
    gap, extrapolated, info = regime.expected_gap(MSTConfig(), 400.0)
    assert gap == pytest.approx(50.0 * 400.0 ** -0.5) and not extrapolated
    assert info["series"] == "default" and info["note"] == "this config is the default one"
    gap, extrapolated, info = regime.expected_gap(MSTConfig(update_interval=7), 4000.0)  # ΔT does not matter
    assert gap == pytest.approx(50.0 / 4000.0 ** 0.5) and extrapolated and info["note"] == "this config is the default one"
    gap, extrapolated, info = regime.expected_gap(MSTConfig(sparsity=0.5), 400.0)
    assert gap is not None and "differs from both measured ones" in info["note"]


def test_no_map_or_no_fit_gives_no_gap(monkeypatch):
    monkeypatch.setattr(regime, "regime_map", lambda: None)
    assert regime.expected_gap(MSTConfig(), 50.0)[:2] == (None, True)
    assert regime.regime_note(MSTConfig(), 50.0) is None


def test_the_note_only_below_the_five_percent_point(fake_map):
    assert regime.regime_note(MSTConfig(), 100.0) is None
    note = regime.regime_note(MSTConfig(), 12.0)
    assert note.startswith("this run trains 12.0 tokens per parameter")
    assert "ends about 14% above dense at this ratio by the map's fit" in note  # 50 / sqrt(12)
    assert "+15.8% at 10 tokens/param, 2.0x fewer FLOPs" in note  # the nearest measured point
    assert "within 5% of dense from about 100 tokens/param" in note and "extrapolated" not in note
    assert "about 16% above" in regime.regime_note(MSTConfig(), 1.0)  # below the map: read at its end (10), not beyond


def test_the_note_where_the_gap_grows_with_tokens_per_param(monkeypatch):
    """A map whose fitted gap grows (MST nearest dense on few tokens per parameter): a note where the fit, inside the
    measured range, is above 5%, none below it, and it says which way the gap goes."""
    grows = {**MAP, "configs": {**MAP["configs"], "default": {
        **MAP["configs"]["default"], "fit": {"a": 1.0, "b": -0.5}, "within_5pct_at": None, "vs_dense_avg": []}}}
    monkeypatch.setattr(regime, "regime_map", lambda: grows)
    assert regime.regime_note(MSTConfig(), 16.0) is None and regime.regime_note(MSTConfig(), 0.5) is None  # 4%, 3.2%
    note = regime.regime_note(MSTConfig(), 400.0)  # 1 · 400^0.5 = 20%
    assert "ends about 20% above dense" in note and "the gap grows with tokens per parameter across the measured range 10-1,000" in note
    assert "about 32% above" in regime.regime_note(MSTConfig(), 1e6)  # read at the measured end, not extrapolated


def test_the_average_size_dense_model_nearby(fake_map):
    v = regime.versus_dense_avg(MSTConfig(update_interval=7), 30.0)  # nearer 10 than 100 in log space
    assert v["tokens_per_param"] == 10.0 and v["verdict"] == "above"
    assert regime.versus_dense_avg(MSTConfig(), 500.0)["verdict"] == "mixed"  # beyond the last point: the last
    # measured for the defaults only: none for the paper preset or another config
    assert regime.versus_dense_avg(MSTConfig.preset("paper"), 50.0) is None
    assert regime.versus_dense_avg(MSTConfig(sparsity=0.5), 50.0) is None
    text = regime.versus_text(v)
    assert "dense model of MST's average size ended below MST at every seed (MST +4.0% / +5.5% / +3.5%" in text
    assert "2,500 parameters, 2.1x fewer FLOPs than dense" in text


def test_the_note_says_to_train_the_smaller_dense_model_where_it_won(fake_map, monkeypatch):
    note = regime.regime_note(MSTConfig(), 12.0)  # far from dense and beaten by the average-size model
    assert "train that model instead" in note and "+15.8% at 10 tokens/param" in note
    assert regime.regime_note(MSTConfig(sparsity=0.5), 12.0) is not None  # the gap note without the comparison
    assert "train that model instead" not in regime.regime_note(MSTConfig(sparsity=0.5), 12.0)
    # within 5% of dense: a note only where the average-size model ended below MST at every seed
    won = {**MAP, "configs": {**MAP["configs"], "default": {**MAP["configs"]["default"], "vs_dense_avg": [
        {**MAP["configs"]["default"]["vs_dense_avg"][1], "gaps_pct": [1.0, 0.5], "verdict": "above"}]}}}
    monkeypatch.setattr(regime, "regime_map", lambda: won)
    note = regime.regime_note(MSTConfig(), 500.0)
    assert note.startswith("this run trains 500.0 tokens per parameter; at 100 tokens/param on the map") and "instead" in note
    monkeypatch.setattr(regime, "regime_map", lambda: MAP)  # mixed there: no note
    assert regime.regime_note(MSTConfig(), 500.0) is None


def test_the_shipped_map_reads():
    m = regime.regime_map()
    assert m is not None and {"default", "paper"} <= set(m["configs"])
    lo, hi = m["measured_range"]
    gap, extrapolated, info = regime.expected_gap(MSTConfig(), (lo * hi) ** 0.5)
    fit = m["configs"]["default"]["fit"]
    assert gap == pytest.approx(fit["a"] * ((lo * hi) ** 0.5) ** -fit["b"]) and not extrapolated
