"""docs/sites.md cannot drift: every TOML example loads against the schema, every key is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ted_fl.data import LAYOUTS, load_site_set_spec
from ted_fl.data import spec as S

DOC = Path(__file__).resolve().parents[2] / "docs" / "sites.md"


def toml_examples() -> dict[str, str]:
    """The page's ```toml blocks by their `# example: NAME` first line."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    out = {}
    for b in blocks:
        m = re.match(r"# example: (\w+)\n", b)
        assert m, f"a TOML block of {DOC} lacks its '# example: NAME' first line:\n{b[:200]}"
        out[m.group(1)] = b
    return out


def test_page_has_the_worked_examples() -> None:
    assert set(toml_examples()) >= {"inverted", "fundus", "rgb", "nifti", "official"}


@pytest.mark.parametrize("name", sorted(toml_examples()))
def test_every_example_loads_against_the_schema(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(toml_examples()[name])
    spec = load_site_set_spec(path)
    assert spec.sites and spec.label_set().classes


def test_fundus_example_declares_three_labels_and_a_region(tmp_path: Path) -> None:
    path = tmp_path / "fundus.toml"
    path.write_text(toml_examples()["fundus"])
    spec = load_site_set_spec(path)
    labels = spec.label_set()
    assert labels.classes == ("rim", "cup") and labels.out_channels == 3
    assert labels.labels() == [("rim", (1,)), ("cup", (2,)), ("disc", (1, 2))]
    assert spec.site("CamC").labels.classes == {"rim": [128], "cup": [64]}  # per-site override
    assert spec.site("CamA").labels.classes == {"rim": [128], "cup": [0]}


SCHEMA = [S.SiteSetHeader, S.SetSyntheticSpec, S.SiteSpec, S.FilesSpec, S.CsvSpec, S.LabelSpec,
          S.PreprocessSpec, S.SyntheticSpec]


@pytest.mark.parametrize("cls", SCHEMA, ids=lambda c: c.__name__)
def test_every_schema_key_is_documented(cls: type) -> None:
    text = DOC.read_text()
    missing = [f.name for f in dataclasses.fields(cls) if not re.search(rf"[`.]{f.name}\b", text)]
    assert not missing, f"{cls.__name__} keys not in {DOC.name}: {missing}"


def test_every_layout_is_documented() -> None:
    text = DOC.read_text()
    assert [name for name in LAYOUTS if f"`{name}`" not in text] == []
