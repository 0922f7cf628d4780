"""Markdown for generated docs: tables from pandas frames and sections rewritten in place.

The results page, the benchmark page and the README's measured figures are all generated from
run directories; these two helpers are what they share.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ted_fl.files import atomic_write_text


def cell(v: object, digits: int = 3) -> str:
    """Floats to `digits` decimals, NaN as a dash, anything else as text."""
    if isinstance(v, float | np.floating):
        return "–" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def md_table(df: pd.DataFrame, index: bool = False, index_name: str = "", digits: int = 3) -> str:
    """A GitHub table of a small frame (pandas' to_markdown needs tabulate, not a dependency)."""
    head = [str(c) for c in df.columns]
    if index:
        head = [index_name or str(df.index.name or ""), *head]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.astype(object).iterrows():
        cells = [cell(v, digits) for v in row]
        lines.append("| " + " | ".join([cell(idx, digits), *cells] if index else cells) + " |")
    return "\n".join(lines)


def write_section(doc: Path, name: str, body: str, header: str = "", order: list[str] | None = None,
                  tag: str = "section") -> Path:
    """Replace the block between `<!-- tag:name:start -->` and `<!-- tag:name:end -->` in `doc`.

    Other sections stay as they are; a new one goes before the first later section of `order`,
    else at the end. A missing `doc` starts from `header`.
    """
    start, end = f"<!-- {tag}:{name}:start -->", f"<!-- {tag}:{name}:end -->"
    text = doc.read_text() if doc.is_file() else header
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        later = []
        if order and name in order:
            later = [s for s in order[order.index(name) + 1 :] if f"<!-- {tag}:{s}:start -->" in text]
        if later:
            anchor = f"<!-- {tag}:{later[0]}:start -->"
            text = text.replace(anchor, block + "\n\n" + anchor, 1)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, text)
    return doc


def marked_sections(text: str, tag: str = "section") -> list[str]:
    """Every `<!-- tag:name:start -->...<!-- tag:name:end -->` block of `text`, in order.

    A page regenerated whole (results_doc) keeps the blocks other writers own (e.g. gkd_report's)."""
    pattern = rf"<!-- {tag}:([\w.-]+):start -->.*?<!-- {tag}:\1:end -->"
    return [m.group(0) for m in re.finditer(pattern, text, flags=re.S)]
