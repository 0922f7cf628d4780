"""The one file writer and the output-folder check: results get the process umask, and a folder that
cannot be created is one line naming it, with nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ted_fl.errors import TedFlError
from ted_fl.files import atomic_write_text, check_creatable, umask


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_gives_the_umask_mode(tmp_path: Path, mask: int) -> None:
    """As `open()` would: 0666 less the umask (mkstemp alone gives 0600, unreadable to a shared group)."""
    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write_text(tmp_path / "summary.csv", "a,b\n")
        plain = tmp_path / "plain.log"
        plain.write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "summary.csv").stat().st_mode)
    assert mode == 0o666 & ~mask == stat.S_IMODE(plain.stat().st_mode), oct(mode)
    assert [p.name for p in tmp_path.iterdir()].count("summary.csv") == 1  # no temporary file left


def test_check_creatable_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TedFlError, match=rf"output folder '{a_file}/runs' cannot be created: '{a_file}' is a file"):
        check_creatable(a_file / "runs", "--out / out")
    with pytest.raises(TedFlError, match=r"output folder '/proc/ted-fl-x/runs' cannot be created or written .*--out"):
        check_creatable("/proc/ted-fl-x/runs", "--out / out")
    new = tmp_path / "a" / "b" / "runs"
    check_creatable(new, "--out / out")  # creatable: checked by creating it, then removed again
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    check_creatable(tmp_path / "kept", "--out / out")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through every permission bit")
def test_check_creatable_refuses_a_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(TedFlError, match=r"'.*ro/runs' cannot be created or written \(Permission denied\)"):
            check_creatable(ro / "runs", "--out / out")
    finally:
        ro.chmod(0o755)
