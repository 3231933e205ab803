"""The README's "Use from Python" example runs as it stands (in this process, in a fresh folder,
on the session's Ray cluster): the documented API is the one that works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ray_cluster import ray_cluster_fixture, ray_driver_fixture  # noqa: F401  (session fixtures)

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(section: str) -> str:
    """The first ```python block of the README section titled `section`."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", body, re.S)
    assert found, f"no python example under '## {section}'"
    return found.group(1)


@pytest.mark.ray
def test_use_from_python_example_runs(ray_driver, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user writes them: Ray's workers run elsewhere
    exec(compile(python_example("Use from Python"), "README.md:Use from Python", "exec"), {})
    out = capsys.readouterr().out
    assert (tmp_path / "py-demo" / "case_0000_mask.nii.gz").is_file()
    assert re.search(r"^ok Box\(.*\) 0\.\d+$", out, re.M), out
    assert re.search(r"^\[\('case_0000', 'ok', 0\.\d+\)\]$", out, re.M), out
    assert "case_id,dsc,t_total_s\ncase_0000," in out
