"""Fuzzed input (Hypothesis): random `--set` keys and values, random experiment and site-set TOML
documents, random bytes as image and mask files. The command line must answer every one with
exit 0 or with exit 2 and exactly one `error:` line: never a traceback, never another code.

Everything runs in-process through `ted_fl.commands.simulate.main(argv)` with `--check` (validation only:
no run directory, no Ray, no Flower). For the option and TOML fuzz the data half of the check is
replaced by a stub (the data is fuzzed on its own below, with the real check). The number of
examples per test is `TED_FL_FUZZ_EXAMPLES` (default 20); `pytest --hypothesis-show-statistics`
prints how many cases ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ted_fl.config import ExperimentConfig
from ted_fl.simulate import main
from tests.unit.test_site_layouts import N, write_small

EXAMPLES = int(os.environ.get("TED_FL_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def schema_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the experiment schema (train.rounds, data.sites, ...)."""
    obj = obj if obj is not None else ExperimentConfig()
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += schema_keys(value, f"{prefix}{f.name}.")
        keys.append(f"{prefix}{f.name}")
    return keys


KEYS = schema_keys()
words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.builds(lambda k, extra: f"{k}.{extra}", st.sampled_from(KEYS), words),  # train.rounds.x
    words,
    st.lists(words, min_size=1, max_size=4).map(".".join),
)
toml_scalars = st.one_of(
    st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), words,
)
raw_values = st.one_of(
    toml_scalars.map(lambda v: tomli_w.dumps({"v": v})[4:].strip()),  # a TOML literal
    words,  # a bare string, or broken TOML
    st.lists(toml_scalars, max_size=3).map(lambda v: tomli_w.dumps({"v": v})[4:].strip()),
)


def run_main(argv: list[str]) -> tuple[int, str]:
    """main(argv) in-process; (exit code, stderr). Any exception other than SystemExit fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


def assert_clean(code: int, stderr: str, argv: list[str]) -> None:
    assert code in (0, 2), (code, argv, stderr[-2000:])
    assert "Traceback" not in stderr, (argv, stderr[-2000:])
    if code == 2:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:") or ": error:" in ln]  # ours, or argparse's
        assert len(errors) == 1, (argv, stderr)


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The option and TOML fuzz checks the configuration; the data half of --check is a stub."""
    from ted_fl.schedule import lifecycle as run_module

    monkeypatch.setattr(run_module, "check_data", lambda cfg: [])
    monkeypatch.chdir(tmp_path)  # a relative --set out=... or cache path lands in tmp
    return tmp_path


@FUZZ
@given(pairs=st.lists(st.tuples(keys, raw_values), min_size=1, max_size=3))
def test_random_set_options(no_data: Path, pairs: list[tuple[str, str]]) -> None:
    argv = ["--check", "--out", str(no_data / "runs")]
    for k, v in pairs:
        argv += ["--set", f"{k}={v}"]
    assert_clean(*run_main(argv), argv)
    assert not (no_data / "runs").exists()


toml_trees = st.recursive(
    toml_scalars | st.lists(toml_scalars, max_size=3),
    lambda children: st.dictionaries(st.one_of(st.sampled_from(KEYS).map(lambda k: k.split(".")[-1]), words),
                                     children, max_size=4),
    max_leaves=12,
)
section_names = st.sampled_from([k for k in KEYS if "." not in k] + ["sites", "defaults", "synthetic", "x"])


def experiment_docs() -> st.SearchStrategy[str]:
    tables = st.dictionaries(section_names, toml_trees, max_size=5)
    return st.one_of(tables.map(tomli_w.dumps), words, st.binary(max_size=64).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(doc=experiment_docs())
def test_random_experiment_files(no_data: Path, doc: str) -> None:
    path = no_data / "simulations" / "fuzz.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc)
    argv = ["--config", str(path), "--check"]
    assert_clean(*run_main(argv), argv)


SITE_KEYS = ["name", "folder", "layout", "files", "labels", "preprocess", "synthetic", "official", "image", "mask",
             "values", "classes", "regions", "size", "normalize", "clip", "channel", "generator", "volumes"]


def site_docs() -> st.SearchStrategy[str]:
    leaf = toml_scalars | st.lists(toml_scalars, max_size=3)
    entry = st.dictionaries(st.sampled_from(SITE_KEYS) | words, st.recursive(
        leaf, lambda c: st.dictionaries(st.sampled_from(SITE_KEYS) | words, c, max_size=3), max_leaves=6),
        max_size=5)
    doc = st.fixed_dictionaries(
        {}, optional={"name": words, "description": words, "evaluation": st.sampled_from(["volume", "image"]) | words,
                      "val_fraction": toml_scalars, "test_fraction": toml_scalars, "defaults": entry,
                      "synthetic": entry, "sites": st.lists(entry, max_size=3)})
    return st.one_of(doc.map(tomli_w.dumps), words)


@FUZZ
@given(doc=site_docs())
def test_random_site_set_files(no_data: Path, doc: str) -> None:
    path = no_data / "sites" / "fuzz.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc)
    argv = ["--sites", str(path), "--check"]
    assert_clean(*run_main(argv), argv)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_small(tmp_path_factory.mktemp("small"), n_train=2)


@FUZZ
@given(which=st.lists(st.tuples(st.sampled_from(["images", "masks"]), st.sampled_from(["train", "test"]),
                                st.integers(0, 1)), min_size=1, max_size=3, unique=True),
       blobs=st.lists(st.binary(max_size=300) | st.just(b"\x89PNG\r\n\x1a\n") | st.just(b""), min_size=3, max_size=3))
def test_random_bytes_as_images_and_masks(small_set: tuple[Path, Path], tmp_path: Path,
                                          which: list[tuple[str, str, int]], blobs: list[bytes]) -> None:
    """The real data check (the loaders) on a small PNG set whose files are replaced by random bytes."""
    toml, clean = small_set
    data = tmp_path / "data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(clean, data)
    for (kind, split, i), blob in zip(which, blobs, strict=False):
        (data / "H1" / split / kind / f"{split}{i}.png").write_bytes(blob)
    argv = ["--sites", str(toml), "--data-dir", str(data), "--check", "--set", f"data.size={N}",
            "--set", "train.select_best=false", "--out", str(tmp_path / "runs")]
    assert_clean(*run_main(argv), argv)
