"""No pickle on the wire, anywhere in the project.

Pickle executes code chosen by whoever wrote the bytes, so one pickled message from a peer
is remote code execution. This scans every Python file in the repository (AST, so comments and
strings do not count) for the ways pickle gets in: the modules, pyzmq's *_pyobj helpers,
`torch.load` without `weights_only=True`, `numpy.load(allow_pickle=True)`, and the
multiprocessing / process-pool channels that pickle what they carry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not the project: build outputs, and hidden folders (.git, .venv, tool caches, a local
# checkout of another project kept beside this one).
SKIP_DIRS = {"build", "dist", "__pycache__"}
# The transport benchmark measures pickle over ZeroMQ as the baseline the issue asks to beat;
# it never runs in the server.
ALLOWED = {"benchmarks/transport.py"}

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}
PICKLING_CALLS = {"recv_pyobj", "send_pyobj", "read_pickle", "to_pickle"}
PICKLING_CHANNELS = {
    "multiprocessing": {"Queue", "SimpleQueue", "JoinableQueue", "Pipe", "Manager", "Pool"},
    "concurrent.futures": {"ProcessPoolExecutor"},
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: bool) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value
        for kw in call.keywords
    )


def pickle_uses(source: str) -> list[str]:
    """Each pickle use in `source` as 'line N: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"line {line}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"line {line}: from {node.module} import")
            for module, names in PICKLING_CHANNELS.items():
                if node.module == module or node.module.startswith(module + "."):
                    found += [
                        f"line {line}: {module}.{a.name}" for a in node.names if a.name in names
                    ]
        elif isinstance(node, ast.Attribute) and node.attr in PICKLING_CALLS:
            found.append(f"line {line}: {node.attr}")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            for module, names in PICKLING_CHANNELS.items():
                prefixes = {module, module.split(".")[-1], "mp"}
                owner, _, attr = dotted.rpartition(".")
                if attr in names and owner in prefixes:
                    found.append(f"line {line}: {dotted}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            is_torch_load = name == "torch.load" or name.endswith(".torch.load")
            if is_torch_load and not _keyword_is(node, "weights_only", True):
                found.append(f"line {line}: torch.load without weights_only=True")
            is_numpy_load = name.split(".")[-1] == "load" and name.split(".")[0] in {"np", "numpy"}
            if is_numpy_load and _keyword_is(node, "allow_pickle", True):
                found.append(f"line {line}: numpy.load(allow_pickle=True)")
    return found


def _skipped(folder: str) -> bool:
    return folder in SKIP_DIRS or folder.startswith(".") or folder.endswith(".egg-info")


def _python_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*.py"):
        if not any(_skipped(part) for part in path.relative_to(ROOT).parts[:-1]):
            files.append(path)
    return sorted(files)


def test_no_pickle_anywhere_in_the_source_tree() -> None:
    files = _python_files()
    assert any(path.relative_to(ROOT).as_posix() == "transport/codec.py" for path in files)
    offenders = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        if relative in ALLOWED:
            continue
        offenders += [f"{relative} {use}" for use in pickle_uses(path.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize(
    "snippet,expected",
    [
        ("import pickle", ["line 1: import pickle"]),
        ("from cloudpickle import dumps", ["line 1: from cloudpickle import"]),
        ("sock.recv_pyobj()", ["line 1: recv_pyobj"]),
        ("socket.send_pyobj(x)", ["line 1: send_pyobj"]),
        ("torch.load(path)", ["line 1: torch.load without weights_only=True"]),
        ("torch.load(path, weights_only=False)", ["line 1: torch.load without weights_only=True"]),
        ("torch.load(path, weights_only=True)", []),
        ("np.load(f, allow_pickle=True)", ["line 1: numpy.load(allow_pickle=True)"]),
        ("q = multiprocessing.Queue()", ["line 1: multiprocessing.Queue"]),
        ("from multiprocessing import Pipe", ["line 1: multiprocessing.Pipe"]),
        (
            "from concurrent.futures import ProcessPoolExecutor",
            ["line 1: concurrent.futures.ProcessPoolExecutor"],
        ),
        ("x = 'import pickle'  # pickle.loads in a comment", []),
        ("msgspec.msgpack.decode(b)", []),
    ],
)
def test_scanner_catches_each_way_in(snippet: str, expected: list[str]) -> None:
    assert pickle_uses(snippet) == expected
