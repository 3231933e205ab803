"""The compute core runs on a bare GPU box: every core module imports with Ray unavailable.

Checked in a fresh interpreter whose import system refuses `ray` and `ray.*`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CORE_MODULES = [
    "config", "errors", "storage", "volumes", "preprocess", "model", "windows",
    "postprocess", "engine", "metrics", "synthetic", "bundle",
]

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib, importlib.abc, importlib.util, json, sys

class BlockRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None

sys.meta_path.insert(0, BlockRay())
try:
    import ray  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

imported, absent = [], []
for name in json.loads(sys.argv[1]):
    if importlib.util.find_spec(f"resdsn_ray.{name}") is None:
        absent.append(name)
        continue
    importlib.import_module(f"resdsn_ray.{name}")
    imported.append(name)
print(json.dumps({"blocked": blocked, "imported": imported, "absent": absent,
                  "ray_loaded": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


def test_core_modules_import_without_ray():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(CORE_MODULES)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, f"a core module needs ray (or failed to import):\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"imported without ray: {report['imported']}; not present yet: {report['absent']}")
    assert report["blocked"], "the ray blocker did not work"
    assert report["ray_loaded"] == []
    assert {"config", "errors", "storage", "volumes"} <= set(report["imported"])
