"""The compute core runs on a bare GPU box: every Ray-free module imports with Ray unavailable.

Every module of the package is listed as Ray-free or as a Ray layer, so a new module must be
placed; checked in a fresh interpreter whose import system refuses `ray` and `ray.*`. The same
check keeps torch out of the CPU tasks' modules: their worker processes start without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_FREE = [
    "config", "errors", "storage", "volumes", "preprocess", "model", "windows", "postprocess", "engine", "deadline",
    "metrics", "mask_stats", "synthetic", "bundle", "provenance", "sampling", "recipes", "archive", "runs", "query",
    "report", "pictures", "case_files", "stages", "model_stages", "boxes", "flags", "cli", "devices", "dicom_seg", "lease", "progress", "api",
]
RAY_LAYERS = ["cluster", "pipeline", "training", "cv"]
TORCH_FREE = ["stages", "boxes", "preprocess", "postprocess", "metrics", "volumes", "case_files", "runs", "archive"]

CHILD = r"""
import importlib, importlib.abc, json, sys

BLOCKED = sys.argv[2] if len(sys.argv) > 2 else "ray"

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
try:
    importlib.import_module(BLOCKED)
    blocked = False
except ImportError:
    blocked = True
for name in json.loads(sys.argv[1]):
    importlib.import_module(f"resdsn_ray.{name}")
print(json.dumps({"blocked": blocked, "loaded": sorted(m for m in sys.modules if m == BLOCKED or m.startswith(BLOCKED + "."))}))
"""


def test_every_module_is_placed():
    modules = sorted(p.stem for p in (REPO / "resdsn_ray").glob("*.py") if p.stem != "__init__")
    assert sorted(RAY_FREE + RAY_LAYERS) == modules


def import_without(package: str, modules: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(modules), package],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, f"a module that must not need {package} needs it (or failed to import):\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["blocked"], f"the {package} blocker did not work"
    assert report["loaded"] == []


def test_ray_free_modules_import_without_ray():
    import_without("ray", RAY_FREE)


def test_cpu_task_modules_import_without_torch():
    """read_case and finish_case run in CPU tasks: importing torch there cost each worker 1.3 s of
    CPU and ~185 MiB for nothing."""
    import_without("torch", TORCH_FREE)


def test_segment_runs_without_ray(tmp_path):
    """`resdsn segment` on a box with torch but no Ray: the command line imports Ray only where needed."""
    script = CHILD.split("for name in")[0] + (
        "from resdsn_ray import cli, synthetic\n"
        f"synthetic.write_archive({str(tmp_path / 'a')!r}, cases=1, seed=1, shape=(48, 40, 24))\n"
        f"code = cli.main(['segment', {str(tmp_path / 'a' / 'imagesTr' / 'case_0000.nii.gz')!r}, '--out', "
        f"{str(tmp_path / 'm.nii.gz')!r}, '--demo-models', '--n-coarse', '0', '--n-fine', '0'])\n"
        "assert code == 0 and not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "m.nii.gz").exists()
