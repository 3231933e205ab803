"""The package's structure: imports point down only (no cycle), argparse lives in the command line
layer alone, and every flag's default and choices are the settings classes' own."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from resdsn_ray import cli, config
from resdsn_ray.flags import BINDINGS, Binding

PACKAGE = Path(cli.__file__).parent
REPO = PACKAGE.parent
CLI_LAYER = {"cli", "flags"}  # the only modules that may import argparse; nothing imports them


def module_imports() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports anywhere (top level or in functions)."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in sorted(modules):
        found: set[str] = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m.split(".")[1] for m in found if m.startswith("resdsn_ray.") and m.split(".")[1] in modules}
        graph[name] |= {"argparse"} if "argparse" in found else set()
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by depth-first search (each reported once, from its first module)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_cycle():
    graph = {m: {d for d in deps if d != "argparse"} for m, deps in module_imports().items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_argparse_only_in_the_command_line_layer_and_nothing_imports_it():
    graph = module_imports()
    assert sorted(m for m, deps in graph.items() if "argparse" in deps and m not in CLI_LAYER) == []
    assert sorted(m for m, deps in graph.items() if deps & CLI_LAYER and m not in CLI_LAYER) == []


def test_jobs_are_one_liners_over_the_cli():
    for job in sorted((REPO / "jobs").glob("*.py")):
        code = [line for line in ast.unparse(ast.parse(job.read_text())).splitlines() if line.strip()]
        imports = [line for line in code if line.startswith(("import", "from"))]
        assert imports == ["import sys", "from resdsn_ray.cli import main"], job.name


# ------------------------------------------------------------------------------ flag defaults

# Settings instances to read defaults from, independently of how the flags computed theirs.
ROOTS = {
    config.EngineConfig: config.EngineConfig(),
    config.Resources: config.Resources(),
    config.OutputConfig: config.OutputConfig(),
    config.ArchiveJob: config.ArchiveJob(input="in", output="out", coarse=None, fine=None),
    config.CVJob: config.CVJob(data="d", output="o", train={}),
}
# Flags with a default of the command line's own (not a setting): the demo, synthetic archives,
# output formats, the training recipe's preset, and the training's cluster share (train()'s).
CLI_OWN = {"--demo-dir", "--demo-cases", "--seed", "--shape", "--format", "--by", "--preset", "--workers",
           "--cpus-per-worker", "--max-failures"}


def subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found |= subparsers(sub, prefix + name + " ")
    return found


def value_at(obj: object, path: str) -> object:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


@pytest.mark.parametrize("command", sorted(subparsers(cli.build_parser())))
def test_every_flag_default_is_the_settings_default(command):
    parser = subparsers(cli.build_parser())[command]
    bound: dict[str, Binding] = {b.dest: b for b in parser.get_default(BINDINGS) or []}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        flag = action.option_strings[0]
        binding = bound.get(action.dest)
        if binding is None:
            assert action.default in (None, False) or flag in CLI_OWN, f"{command} {flag}: default {action.default!r} not from a setting"
            continue
        for path in binding.paths:
            expected = value_at(ROOTS[binding.root], path)
            assert action.default in (None, expected), f"{command} {flag}: {action.default!r} != {path} {expected!r}"
            owner = value_at(ROOTS[binding.root], path.rsplit(".", 1)[0]) if "." in path else ROOTS[binding.root]
            allowed = config.choices(type(owner), path.rsplit(".", 1)[-1])
            if allowed:
                assert tuple(action.choices) == allowed, f"{command} {flag}: choices {action.choices} != {allowed}"


def test_training_flags_defaults_are_the_training_functions():
    from resdsn_ray.training import train

    parser = subparsers(cli.build_parser())["train"]
    parameters = inspect.signature(train).parameters
    for dest in ("workers", "cpus_per_worker", "max_failures"):
        assert parser.get_default(dest) == parameters[dest].default


def test_demo_windows_are_the_demo_settings():
    args = cli.build_parser().parse_args(["archive"])
    from resdsn_ray.flags import settings

    assert settings(args, config.DEMO_ENGINE) == config.DEMO_ENGINE
    given = cli.build_parser().parse_args(["archive", "--input", "x", "--n-coarse", "3"])
    assert settings(given, config.EngineConfig()) == dataclasses.replace(
        config.EngineConfig(), coarse=config.WindowConfig(n=3))


# --------------------------------------------------------------------- refusals at the command line


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["segment", "x.nii.gz", "--out", "m.nii.gz", "--n-coarse", "-1"], "--n-coarse"),
        (["segment", "x.nii.gz", "--out", "m.nii.gz", "--post-ratio", "2"], "--post-ratio"),
        (["train", "--stage", "coarse", "--data", "d", "--output", "o", "--patch", "12"], "--patch"),
        (["cv", "--data", "d", "--output", "o", "--train-batch-size", "0"], "--train-batch-size"),
        (["archive", "--input", "in", "--output", "out", "--demo-models", "--read-tasks", "0"], "--read-tasks"),
        (["cv", "--data", "d", "--output", "o", "--folds", "1"], "--folds"),
        (["archive", "--input", "in", "--output", "out"], "--coarse"),  # real CT needs real models
        (["segment", "x.nii.gz", "--out", "m.nii.gz", "--fine", "f"], "--coarse"),
    ],
)
def test_a_bad_setting_is_refused_by_name_with_exit_2(argv, flag, capsys):
    code = cli.main(argv)  # in this process: the same main the console script runs (tested below)
    error = capsys.readouterr().err
    assert code == 2, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in error, error


@pytest.mark.parametrize("argv", [["-m", "resdsn_ray.cli", "archive", "--help"], ["jobs/segment_archive.py", "--help"],
                                  ["jobs/train.py", "--help"], ["jobs/cross_validate.py", "--help"]])
def test_help_works(argv):
    done = run(*argv)
    assert done.returncode == 0, done.stderr
    assert "--output" in done.stdout
