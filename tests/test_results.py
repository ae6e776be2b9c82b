"""Chapter results round-trip through their JSON files unchanged, and a malformed file fails in one line.

Each class is round-tripped from a hand-made minimal instance. The real metrics files of a finished run are
read back the same way after the book has run: ``test_book_outputs.py``'s
``test_every_metrics_file_reads_back_into_its_class_unchanged``.
"""

from __future__ import annotations

import json

import pytest
from result_examples import EXAMPLES, complete

from mechlib import results
from mechlib.paths import RunPaths

CLASSES = results.CHAPTER_RESULTS
IDS = [cls.FILE for cls in CLASSES]


@pytest.fixture
def run(tmp_path, monkeypatch) -> RunPaths:
    from mechlib import paths

    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path)
    return RunPaths("r").make()


def test_every_chapter_has_an_example_and_a_distinct_file():
    assert set(EXAMPLES) == set(CLASSES)
    assert len({cls.FILE for cls in CLASSES}) == len(CLASSES) == 8


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_minimal_instance_round_trips_through_its_file(cls, run):
    obj = EXAMPLES[cls]
    path = results.save(run, obj)
    assert path == run.metrics / f"{cls.FILE}.json"
    assert results.read(run.metrics, cls) == obj
    assert json.loads(path.read_text()) == obj.to_json()


def test_the_statistic_key_follows_top_d():
    layers = EXAMPLES[results.Layers]
    d = layers.to_json()
    assert "top10_abs_d" not in d and d["top_d"] == 3 and d["top_abs_d"] == [0.25, 0.75]
    assert layers.n_layers == 2 and layers.peak_top_abs_d == 0.75


def test_files_written_before_the_rename_still_read():
    d = EXAMPLES[results.Layers].to_json()
    d["top10_abs_d"] = d.pop("top_abs_d")
    layers = results.Layers.from_json(d)
    assert layers.top_abs_d == [0.25, 0.75] and "top10_abs_d" not in layers.to_json()
    d["top10_abs_d"] = "x"
    with pytest.raises(results.ResultsError, match=r"^Layers: top10_abs_d: expected a list, got 'x'$"):
        results.Layers.from_json(d)


def test_a_chapter_that_has_not_run_reads_as_none_and_loading_it_is_an_error(run):
    assert results.read(run.metrics, results.Steering) is None
    with pytest.raises(results.ResultsError, match=r"06_steering\.json not found: run chapter 06 first"):
        results.load(run.metrics, results.Steering)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: d["rows"][1].pop("net_flips"), r"06_steering\.json: rows\[1\]\.net_flips: missing key$"),
        (lambda d: d.update(layer="17"), r"06_steering\.json: layer: expected int, got '17'$"),
        (lambda d: d.update(layer=True), r"06_steering\.json: layer: expected int, got True$"),
        (
            lambda d: d["random_control"]["directions"][0]["vs_caa"].update(a_only=None),
            r"random_control\.directions\[0\]\.vs_caa\.a_only: expected int, got None$",
        ),
        (lambda d: d["rows"][0].update(delta_ci95=[0.1]), r"rows\[0\]\.delta_ci95: expected 2 items, got 1$"),
        (
            lambda d: d["scoring_sensitivity"][0]["rules"][0].update(effect="better"),
            r"scoring_sensitivity\[0\]\.rules\[0\]\.effect: "
            r"expected one of \['helps', 'harms', 'no significant change'\]",
        ),
        (lambda d: d.update(rows={}), r"06_steering\.json: rows: expected a list, got \{\}$"),
    ],
    ids=["missing", "string-for-int", "bool-for-int", "null-for-int", "pair", "literal", "object-for-list"],
)
def test_a_malformed_file_names_the_file_and_the_key(run, break_it, message):
    d = EXAMPLES[results.Steering].to_json()
    break_it(d)
    (run.metrics / "06_steering.json").write_text(json.dumps(d))
    with pytest.raises(results.ResultsError, match=message) as info:
        results.read(run.metrics, results.Steering)
    assert "\n" not in str(info.value) and str(run.metrics) in str(info.value)


def test_unreadable_json_and_a_non_object_are_one_line(run):
    path = run.metrics / "07_logit_lens.json"
    path.write_text("{not json")
    with pytest.raises(results.ResultsError, match=r"07_logit_lens\.json: could not read the metrics"):
        results.read(run.metrics, results.Lens)
    path.write_text("[1, 2]")
    with pytest.raises(results.ResultsError, match=r"07_logit_lens\.json: expected a JSON object"):
        results.read(run.metrics, results.Lens)


def test_integers_read_as_floats_and_unknown_keys_are_ignored():
    d = {**EXAMPLES[results.Lens].to_json(), "english_threshold": 1, "written_by_a_newer_version": 3}
    lens = results.Lens.from_json(d)
    assert lens.english_threshold == 1.0 and isinstance(lens.english_threshold, float)
    assert "written_by_a_newer_version" not in lens.to_json()


def test_keys_one_code_path_writes_are_left_out_by_the_other():
    """Chapter 02 records training counters for a trained SAE only, the source for a loaded one only."""
    trained = EXAMPLES[results.Trained]
    assert {"steps", "tokens", "resumed_from"} <= set(trained.to_json()) and "sae_pretrained" not in trained.to_json()
    loaded = results.Trained(
        sae_source="pretrained",
        d_model=8,
        d_sae=32,
        k=4,
        step_path="none",
        finding="",
        n_steps=0,
        final_batch_fvu=None,
        n_dead_last_step=None,
        checkpoint="hf:me/sae",
        export="outputs/r/export",
        train_config={},
        sae_pretrained="hf:me/sae",
        layer=1,
    )
    d = loaded.to_json()
    assert d["sae_pretrained"] == "hf:me/sae" and "steps" not in d and d["final_batch_fvu"] is None
    assert results.Trained.from_json(d) == loaded


def test_complete_fills_a_partial_dict_from_the_example():
    d = complete({"layer": 3, "rows": [{"scale": 0.5}]}, EXAMPLES[results.Steering].to_json())
    steering = results.Steering.from_json(d)
    assert steering.layer == 3 and steering.rows[0].scale == 0.5 and steering.rows[0].n == 4
