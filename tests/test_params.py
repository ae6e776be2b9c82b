"""The params loader: strict keys with suggestions, types, ranges, and fuzzing."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mechlib.params import BookParams, ParamsError, known_keys, load_params, validate
from mechlib.paths import PARAMS_DIR


def write(tmp_path: Path, values: dict, name: str = "run1.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(values))
    return p


def test_defaults_validate():
    assert validate({}) == BookParams()


def test_run_name_defaults_to_file_stem(tmp_path):
    assert load_params(write(tmp_path, {"k": 16}, "myrun.yaml")).run == "myrun"


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_params_files_load(path):
    params = load_params(path)
    assert params.run == path.stem


def test_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown parameter 'd_sea'.*Did you mean 'd_sae'"):
        load_params(write(tmp_path, {"d_sea": 100}))


def test_unknown_key_without_match(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown parameter 'zzzz'\.$"):
        load_params(write(tmp_path, {"zzzz": 1}))


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"k": "32"}, r"'k' must be int"),
        ({"k": 1.5}, r"'k' must be int"),
        ({"k": True}, r"'k' must be int"),
        ({"lr": "fast"}, r"'lr' must be float"),
        ({"steering_scales": [0.1, "x"]}, r"'steering_scales' must be"),
        ({"k": 0}, r"must be positive"),
        ({"k": 4608}, r"need 0 < k < d_sae"),
        ({"layer": -1}, r"'layer' must be >= 0"),
        ({"task": "mmlu"}, r"'task' must be one of arithmetic, gsm8k"),
        ({"n_heldout": 300}, r"'n_heldout' \(300\) must be smaller"),
        ({"n_random_directions": -1}, r"'n_random_directions' must be >= 0"),
        ({"random_control_scale": 0.0}, r"'random_control_scale' must be non-zero"),
        ({"sae_source": "pretrained"}, r"'sae_pretrained' is empty"),
        ({"lr_floor": 1.0}, r"lr_floor <= lr"),
        ({"lr": float("nan")}, r"'lr' must be a finite number"),
        ({"steering_scales": [0.1, float("inf")]}, r"'steering_scales' must be a finite number"),
        ({"steering_scales": []}, r"'steering_scales' must list at least one scale, got \[\]"),
        ({"n_heldout": 0}, r"'n_heldout' must be positive, got 0"),
        ({"steering_layer": -2}, r"'steering_layer' must be >= 0 or null"),
        ({"device": "gpu"}, r"'device' must be auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
        ({"device": "cuda:x"}, r"'device' must be auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(tmp_path, values, pattern):
    with pytest.raises(ParamsError, match=pattern):
        load_params(write(tmp_path, values))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_spellings_accepted(device):
    assert validate({"device": device}).device == device


@pytest.mark.parametrize(
    "text, expected",
    [("1e-3", 1e-3), ("1E-3", 1e-3), ("2e5", 2e5), ("1.5e-3", 1.5e-3), ("+2E+1", 20.0), (".5", 0.5), ("3", 3.0)],
)
def test_exponent_floats_are_floats_yaml_1_2(tmp_path, text, expected):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3', which the schema then refused as "must be float"
    p = tmp_path / "run.yaml"
    p.write_text(f"lr: {text}\nlr_floor: 0\nrandom_control_scale: {text}\n")
    params = load_params(p)
    assert params.lr == expected and isinstance(params.lr, float)
    assert params.random_control_scale == expected


def test_ints_stay_ints_and_quoted_exponents_stay_strings(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("k: 16\nd_sae: 1_024\nsteering_scales: [1e-2, 2E-2, -5e-2]\nlens_prompt: '1e-3'\n")
    params = load_params(p)
    assert (params.k, params.d_sae) == (16, 1024) and isinstance(params.k, int)
    assert params.steering_scales == [0.01, 0.02, -0.05] and params.lens_prompt == "1e-3"
    p.write_text("collect_tokens: 2e5\n")  # an exponent is a float, and an int field says so
    with pytest.raises(ParamsError, match=r"'collect_tokens' must be int, got 200000.0 \(float\)"):
        load_params(p)


def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("layer: 15\nk: 16\nlayer: 20\n")
    with pytest.raises(ParamsError, match=rf"^{p}:3: duplicate key 'layer' \(first set on line 1\)"):
        load_params(p)


def test_merge_keys_may_override_without_being_duplicates():
    from mechlib.params import ParamsLoader

    text = "base: &b {x: 1, y: 2}\nrun: {<<: *b, x: 5}\n"
    assert yaml.load(text, Loader=ParamsLoader)["run"] == {"x": 5, "y": 2}


def test_int_accepted_where_float_expected():
    p = validate({"lr": 1, "lr_floor": 0})
    assert isinstance(p.lr, float) and p.lr == 1.0


def test_optional_layer_accepts_null():
    assert validate({"steering_layer": None}).steering_layer is None
    assert validate({"steering_layer": 3}).steering_layer == 3


def test_not_a_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(p)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("k: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(p)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*known_keys(), "bogus", "d_sea", "Layer"]), _values, max_size=6))
def test_fuzzed_params_either_load_or_raise_params_error(values):
    """Whatever a hand-edited file holds, the loader returns valid params or one ParamsError — never a crash."""
    try:
        params = validate(values)
    except ParamsError as exc:
        assert str(exc)
        return
    for key, value in values.items():
        got = getattr(params, key)
        assert got == value or (isinstance(value, int) and got == float(value))
    assert 0 < params.k < params.d_sae


def test_schema_fields_are_documented_in_defaults():
    # Every field has a default, so a params file may set only what it changes.
    for f in dataclasses.fields(BookParams):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


@pytest.mark.parametrize("value", [0, 0.5, 0.25])
def test_placeholder_labels_accepts_off_or_a_fraction(value):
    assert validate({"placeholder_labels": value}).placeholder_labels == value


@pytest.mark.parametrize("value", [1, 1.0, -0.1, 2.5])
def test_placeholder_labels_outside_the_unit_interval_is_refused(value):
    with pytest.raises(ParamsError, match=r"'placeholder_labels' must be 0 \(off\) or a fraction"):
        validate({"placeholder_labels": value})


def test_placeholder_labels_refuses_a_bare_boolean():
    with pytest.raises(ParamsError, match="'placeholder_labels' must be float"):
        validate({"placeholder_labels": True})


# Keys that validate() checks against each other: a chapter that declares one of a pair and not the
# other validates the undeclared one at its schema default, so a run with e.g. n_questions 24 (below the
# default n_heldout 50) failed in chapter 05 although the run's own params were valid (tiny book).
CROSS_CHECKED = [
    ("n_questions", "n_heldout"),
    ("d_sae", "k"),
    ("seq_len", "exclude_first_positions"),
    ("lr", "lr_floor"),
    ("sae_source", "sae_pretrained"),
    ("n_random_directions", "random_control_scale"),
]


def test_chapters_declare_both_keys_of_every_cross_checked_pair():
    import papermill

    from mechlib.book import chapters

    for chapter in chapters():
        import jupytext

        declared = set(papermill.inspect_notebook(jupytext.read(chapter.source)))
        for a, b in CROSS_CHECKED:
            assert (a in declared) == (b in declared), f"{chapter.name} declares only one of {a}, {b}"


def test_every_field_has_a_docstring_and_choices_come_from_literal_hints():
    """Each BookParams field is followed by its docstring (as sparsify's config.py); the allowed values of a
    choice are its ``Literal`` hint's, so there is no second list to keep in step; a section is built, not copied."""
    import ast
    import dataclasses
    import inspect
    import typing

    from mechlib import params
    from mechlib.sae import TrainConfig

    body = ast.parse(inspect.getsource(params.BookParams)).body[0].body
    documented = {
        stmt.target.id
        for stmt, nxt in itertools.pairwise(body)
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)
    }
    assert set(params.known_keys()) - documented == set()
    assert params.CHOICES["model_dtype"] == typing.get_args(typing.get_type_hints(params.BookParams)["model_dtype"])
    assert params.CHOICES["prompt_format"] == tuple(params.PROMPT_FORMATS)
    P = params.BookParams(k=64, lr=5e-4)
    cfg = P.train_config()
    assert isinstance(cfg, TrainConfig) and (cfg.k, cfg.lr) == (64, 5e-4)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(params.known_keys())
    assert {n: getattr(cfg, n) for n in shared} == {n: getattr(P, n) for n in shared}


def test_grpo_settings_are_built_from_the_params():
    from mechlib.params import BookParams

    p = BookParams(grpo_steps=5, grpo_lora_r=4, grpo_temperature=0.9, seed=3, grpo_gradient_checkpointing=True)
    s = p.grpo_settings()
    assert (s.steps, s.lora_r, s.lora_alpha, s.temperature, s.seed, s.gradient_checkpointing) == (5, 4, 8, 0.9, 3, True)
    assert (s.num_generations, s.max_completion_length) == (p.grpo_generations, p.grpo_max_completion_length)
