"""One list per set of allowed values: the schema's `Literal`s (ted_fl.config) own them, every other
module derives its list from them (`config.choices`), and no module spells one out again."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import ted_fl
from ted_fl import config as C
from ted_fl.continual import combined, device, evaluation, gkd, networks, reference_unet, terms
from ted_fl.run import diagnostics
from ted_fl.studies import privacy_utility

PACKAGE = Path(ted_fl.__file__).parent


def schema_literals() -> dict[str, frozenset[str]]:
    """Every `Literal` of strings the schema declares at module level, by name -> its values."""
    out = {}
    for name, value in vars(C).items():
        if typing.get_origin(value) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(value)):
            out[name] = frozenset(typing.get_args(value))
    return out


def test_the_derived_lists_are_the_schema_values() -> None:
    assert C.choices(C.AmpMode) == device.AMP_MODES
    assert C.choices(C.KDReduce) == terms.KD_REDUCE
    assert C.choices(C.BaselineVariant) == terms.BASELINE_VARIANTS
    assert C.choices(C.GugfMode) == terms.GUGF_MODES
    assert evaluation.EVAL_BN == diagnostics.MODES == C.choices(C.EvalBN)
    assert networks.NORMS == reference_unet.NORMS == C.choices(C.Norm)
    assert C.choices(C.FixedTerm) == combined.FIXED_TERMS
    assert set(privacy_utility.DP_LEVELS) == set(C.choices(C.DPLevel)) - {"off"}
    assert set(gkd.AUGMENT) == set(C.choices(C.Augment))  # a registry keyed on the values covers exactly them
    assert C.choices(C.GKDApproachName) == gkd.GKD_APPROACHES


def test_no_module_spells_out_a_schema_list_again() -> None:
    """A tuple, list or set of string constants equal to a schema Literal's values, outside config.py,
    is a second list that can drift from the schema: derive it with `config.choices` instead."""
    literals = {values: name for name, values in schema_literals().items() if len(values) > 1}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) > 1 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = frozenset(e.value for e in node.elts)  # type: ignore[attr-defined]
                if values in literals:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} repeats config.{literals[values]}")
    assert not found, found
