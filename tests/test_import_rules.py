"""The layering of the project, as a test: who may import whom.

The packages are layered: the transport knows no one above it; the caches know neither the
stages nor the server; each stage (LLM core, encoders, generators) stands alone, and talks to the
orchestrator and to other stages only through its role's contract (`omni.stages.contracts`),
so the server imports contracts, never a stage's implementation. This walks the AST of every
module of the packages pyproject maps (`omni`, and `stages`, `cache`, `transport` under it),
counting every import: at the top, inside functions, under `TYPE_CHECKING`.

Then the contracts themselves: no field of any struct a contract declares is `Any`, however
deeply nested (a list of, a dict of, a union with).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent

# The stages' own implementations: none may import another, or the server.
STAGE_PACKAGES = ("omni.stages.llm", "omni.stages.encoders", "omni.stages.generators")
# What every side may import of `omni.stages`: the role contracts, the stage runtime (which the
# server also runs in-process), the checkpoint helpers and the Triton kernels several stages run.
SHARED_STAGE_MODULES = (
    "omni.stages.contracts",
    "omni.stages.runtime",
    "omni.stages.checkpoint",
    "omni.stages.kernels",
)
# The orchestrator side, which the caches serve and must not know: the HTTP server, the
# router and supervisor, request planning, the command line and the offline front end (the
# package root lazily exports it).
ORCHESTRATOR_SIDE = (
    "omni.server",
    "omni.supervision",
    "omni.multimodal",
    "omni.commands",
    "omni.cli",
    "omni.llm",
)


def _under(module: str, packages: str | tuple[str, ...]) -> bool:
    """`module` is one of `packages` or inside one of them."""
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def _stage_package(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if _under(module, p)), None)


def broken_rule(importer: str, imported: str) -> str | None:
    """The rule `importer` breaks by importing `imported`, or None."""
    if not _under(imported, "omni"):
        return None  # the standard library and third-party packages
    if _under(importer, "omni.transport"):
        if not _under(imported, "omni.transport"):
            return "the transport imports nothing of omni above it"
        return None
    if _under(importer, "omni.cache"):
        if imported == "omni" or _under(imported, ("omni.stages", *ORCHESTRATOR_SIDE)):
            return "the cache imports no stage and nothing of the orchestrator side"
        return None
    own = _stage_package(importer)
    if own is not None:
        other = _stage_package(imported)
        if other is not None and other != own:
            return "a stage imports no other stage (only contracts, runtime, checkpoint, kernels)"
        if _under(imported, "omni.server"):
            return "a stage does not import the server"
        return None
    if _under(importer, SHARED_STAGE_MODULES):
        if _stage_package(imported) is not None or _under(imported, "omni.server"):
            return "shared stage modules import no stage implementation or server"
        return None
    if _under(importer, "omni.server"):
        allowed = imported == "omni.stages" or _under(imported, SHARED_STAGE_MODULES)
        if _under(imported, "omni.stages") and not allowed:
            return "the server imports stage contracts, runtime, checkpoint and kernels only"
    return None


def _imports(
    module: str, is_package: bool, tree: ast.AST, known: set[str]
) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in `tree`. `from package import name` imports
    the module `package.name` when there is one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if candidate in known else base


def import_violations(
    module: str, source: str, path: str, known: set[str], is_package: bool = False
) -> list[str]:
    """Each import of `module` (source `source`, at `path`) that breaks a rule, as
    'PATH:LINE MODULE imports IMPORTED: RULE'."""
    found = []
    for line, imported in _imports(module, is_package, ast.parse(source), known):
        rule = broken_rule(module, imported)
        if rule is not None:
            found.append(f"{path}:{line} {module} imports {imported}: {rule}")
    return found


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def _package_dir() -> dict[str, str]:
    """pyproject's `[tool.setuptools.package-dir]` table (read by hand: tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([\w./]+)"\s*$', section, re.M))


def project_modules() -> dict[str, Module]:
    """Every module of the packages, named as pyproject's package-dir maps their folders."""
    package_dir = _package_dir()
    # The deepest mapping owns a file: stages/ is omni.stages even though omni/ is omni.
    folders = sorted(package_dir.items(), key=lambda item: -len(Path(item[1]).parts))
    modules: dict[str, Module] = {}
    for package, folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts or path in {m.path for m in modules.values()}:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join([package, *parts])
            modules[name] = Module(name, path, is_package)
    return modules


TRANSPORT_RULE = "the transport imports nothing of omni above it"


def test_pyproject_maps_the_four_folders() -> None:
    assert _package_dir() == {
        "omni": "omni",
        "omni.stages": "stages",
        "omni.cache": "cache",
        "omni.transport": "transport",
    }


def test_the_walk_sees_every_package_under_its_import_name() -> None:
    modules = project_modules()
    expected = [
        ("omni.transport.codec", "transport/codec.py"),
        ("omni.cache.block_pool", "cache/block_pool.py"),
        ("omni.stages.contracts.llm", "stages/contracts/llm.py"),
        ("omni.stages.checkpoint", "stages/checkpoint.py"),
        ("omni.stages.llm.worker", "stages/llm/worker.py"),
        ("omni.server.images", "omni/server/images.py"),
        ("omni.stages", "stages/__init__.py"),
    ]
    assert [(name, modules[name].path.relative_to(ROOT).as_posix()) for name, _ in expected] == (
        expected
    )
    assert not any(name.startswith(("omni.tests", "tests", "omni.benchmarks")) for name in modules)


def test_the_project_follows_the_import_rules() -> None:
    modules = project_modules()
    known = set(modules)
    violations = []
    for module in modules.values():
        source = module.path.read_text(encoding="utf-8")
        relative = module.path.relative_to(ROOT).as_posix()
        violations += import_violations(module.name, source, relative, known, module.is_package)
    assert violations == []


# A synthetic module per rule (and a few that keep to them), checked against the real module
# names so that `from package import module` resolves as in the project.
@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "omni.transport.codec",
            "import numpy\nfrom omni.transport.shm import X\n\ndef f():\n    import omni.media\n",
            [
                "m.py:5 omni.transport.codec imports omni.media: "
                "the transport imports nothing of omni above it"
            ],
        ),
        (
            "omni.transport.codec",
            "from omni import LLM",
            ["m.py:1 omni.transport.codec imports omni: " + TRANSPORT_RULE],
        ),
        (
            "omni.cache.encoder_cache",
            "from omni.transport.shm import X\nfrom omni.stages.contracts import llm\n"
            "from omni.server import orchestrator\n",
            [
                "m.py:2 omni.cache.encoder_cache imports omni.stages.contracts.llm: "
                "the cache imports no stage and nothing of the orchestrator side",
                "m.py:3 omni.cache.encoder_cache imports omni.server.orchestrator: "
                "the cache imports no stage and nothing of the orchestrator side",
            ],
        ),
        (
            "omni.cache.block_pool",
            "if TYPE_CHECKING:\n    from omni.supervision.router import StageRouter\n",
            [
                "m.py:2 omni.cache.block_pool imports omni.supervision.router: "
                "the cache imports no stage and nothing of the orchestrator side"
            ],
        ),
        (
            "omni.stages.encoders.vision",
            "from omni.stages.checkpoint import load_module\n"
            "from omni.stages.contracts.vision import ROLE\n"
            "from omni.stages.llm.models.loader import resolve_dtype\n",
            [
                "m.py:3 omni.stages.encoders.vision imports omni.stages.llm.models.loader: "
                "a stage imports no other stage (only contracts, runtime, checkpoint, kernels)"
            ],
        ),
        (
            "omni.stages.generators.image",
            "from omni.stages import encoders\nfrom ..llm import worker\n",
            [
                "m.py:1 omni.stages.generators.image imports omni.stages.encoders: "
                "a stage imports no other stage (only contracts, runtime, checkpoint, kernels)",
                "m.py:2 omni.stages.generators.image imports omni.stages.llm.worker: "
                "a stage imports no other stage (only contracts, runtime, checkpoint, kernels)",
            ],
        ),
        (
            "omni.stages.llm.worker",
            "from .engine import X\n\ndef f():\n    from omni.server.protocol import APIError\n",
            [
                "m.py:4 omni.stages.llm.worker imports omni.server.protocol: "
                "a stage does not import the server"
            ],
        ),
        (
            "omni.stages.contracts.image",
            "from omni.stages.generators.image_pipeline import BatchShape",
            [
                "m.py:1 omni.stages.contracts.image imports "
                "omni.stages.generators.image_pipeline: "
                "shared stage modules import no stage implementation or server"
            ],
        ),
        (
            "omni.server.images",
            "from omni.stages.contracts.image import CONTRACT\n"
            "from omni.stages.runtime import StageRuntime\n"
            "from omni.stages.checkpoint import resolve_model_path\n"
            "from omni.stages.generators.image import GENERATION_FAILED\n"
            "import omni.stages.encoders.vision\n",
            [
                "m.py:4 omni.server.images imports omni.stages.generators.image: "
                "the server imports stage contracts, runtime, checkpoint and kernels only",
                "m.py:5 omni.server.images imports omni.stages.encoders.vision: "
                "the server imports stage contracts, runtime, checkpoint and kernels only",
            ],
        ),
        (
            "omni.server.pipeline",
            "def served():\n    from omni.stages.llm.models.loader import resolve_model_path\n",
            [
                "m.py:2 omni.server.pipeline imports omni.stages.llm.models.loader: "
                "the server imports stage contracts, runtime, checkpoint and kernels only"
            ],
        ),
        ("omni.server.pipeline", "from .images import ImageService\nimport torch\n", []),
        ("omni.multimodal.requests", "from omni.stages.llm.engine import X", []),
    ],
    ids=[
        "transport imports the media layer",
        "transport imports the package root",
        "cache imports a contract and the server",
        "cache imports the router under TYPE_CHECKING",
        "an encoder imports the LLM stage's loader",
        "a generator imports other stages, absolutely and relatively",
        "a stage imports the server inside a function",
        "a contract imports a stage implementation",
        "the server imports stage implementations",
        "the server imports a stage inside a function",
        "the server's own relative import",
        "modules no rule covers",
    ],
)
def test_each_rule_catches_a_synthetic_violation(
    module: str, source: str, expected: list[str]
) -> None:
    assert import_violations(module, source, "m.py", set(project_modules())) == expected


# -- contracts --------------------------------------------------------------------------------

CONTRACTS = "omni.stages.contracts"


def _contract_modules() -> dict[str, types.ModuleType]:
    package = importlib.import_module(CONTRACTS)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    return {name: importlib.import_module(f"{CONTRACTS}.{name}") for name in names}


def _declared_types(module: types.ModuleType) -> list[type]:
    """The structs and dataclasses `module` defines, and every type its CONTRACT names."""
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and value.__module__ == module.__name__
        and (issubclass(value, msgspec.Struct) or dataclasses.is_dataclass(value))
    ]
    contract = getattr(module, "CONTRACT", None)
    if contract is not None:
        found += [contract.request_type, contract.reply_type, contract.stats_type]
    return found


def any_fields(root: object) -> list[str]:
    """Paths ('Struct.field[...]') at which `Any` (or a bare `object`) types a field of `root`,
    a struct or dataclass, following fields into nested structs and dataclasses and into the
    arguments of list, dict, tuple, Annotated and union types."""
    found: list[str] = []
    seen: set[object] = set()

    def walk(kind: object, path: str) -> None:
        if kind is typing.Any or kind is object:
            found.append(path)
            return
        origin = typing.get_origin(kind)
        if origin is typing.Annotated:
            walk(typing.get_args(kind)[0], path)
            return
        if origin is not None:
            for index, arg in enumerate(typing.get_args(kind)):
                if arg is not Ellipsis:
                    walk(arg, f"{path}[{index}]")
            return
        if isinstance(kind, type) and (
            issubclass(kind, msgspec.Struct) or dataclasses.is_dataclass(kind)
        ):
            if kind in seen:
                return
            seen.add(kind)
            hints = typing.get_type_hints(kind, include_extras=True)
            names = (
                kind.__struct_fields__
                if issubclass(kind, msgspec.Struct)
                else tuple(f.name for f in dataclasses.fields(kind))
            )
            for name in names:
                walk(hints[name], f"{kind.__qualname__}.{name}")

    walk(root, getattr(root, "__qualname__", str(root)))
    return found


def test_every_role_has_a_contract_module() -> None:
    described = {
        name: (
            module.CONTRACT.role,
            module.CONTRACT.request_type.__name__,
            module.CONTRACT.reply_type.__name__,
            module.CONTRACT.stats_type.__name__,
        )
        for name, module in _contract_modules().items()
        if hasattr(module, "CONTRACT")
    }
    assert described == {
        "asr": ("asr", "TranscribeRequest", "Transcript", "ASRStats"),
        "audio": ("audio", "EncodeClips", "EncodeReply", "EncoderStats"),
        "echo": ("echo", "EchoParams", "EchoReply", "EchoStats"),
        "image": ("image", "ImageParams", "ImageReply", "ImageStats"),
        "llm": ("llm", "GenerateRequest", "TokenUpdate", "LLMStats"),
        "ocr": ("ocr", "ReadRequest", "PageText", "OCRStats"),
        "speech": ("speech", "SpeechParams", "SpeechReply", "SpeechStats"),
        "vision": ("vision", "EncodeImage", "EncodeReply", "EncoderStats"),
    }
    # Shared pieces with no role of their own.
    assert sorted(set(_contract_modules()) - set(described)) == [
        "encoder", "sampling", "structured_outputs"
    ]
    assert all(
        module.CONTRACT.role == module.ROLE
        for module in _contract_modules().values()
        if hasattr(module, "CONTRACT")
    )


def test_no_contract_field_is_any() -> None:
    checked: dict[str, list[str]] = {}
    offenders: list[str] = []
    for name, module in _contract_modules().items():
        declared = _declared_types(module)
        checked[name] = sorted({kind.__qualname__ for kind in declared})
        for kind in declared:
            offenders += [f"{CONTRACTS}.{name}: {path}" for path in any_fields(kind)]
    assert offenders == []
    # What was walked (a struct that slipped out of this list would go unchecked).
    assert checked["image"] == ["ImageLimits", "ImageParams", "ImageReply", "ImageStats"]
    assert checked["speech"] == ["SpeechParams", "SpeechReply", "SpeechStats", "VoiceModel"]
    assert checked["llm"] == [
        "GenerateRequest", "LLMStats", "MediaItem", "TokenLogprob", "TokenUpdate"
    ]
    assert checked["sampling"] == ["SamplingParams"]
    assert checked["asr"] == ["ASRStats", "Segment", "TranscribeRequest", "Transcript"]
    assert checked["ocr"] == ["OCRStats", "PageText", "ReadRequest", "TextLine"]
    assert checked["structured_outputs"] == ["StructuredOutputs"]


def test_no_contract_module_mentions_any() -> None:
    """Not even in a helper's signature: a contract is the one place `Any` must not creep in."""
    package = importlib.import_module(CONTRACTS)
    mentions = []
    for path in sorted(Path(package.__path__[0]).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            named = (isinstance(node, ast.Name) and node.id == "Any") or (
                isinstance(node, ast.Attribute) and node.attr == "Any"
            )
            imported = isinstance(node, ast.ImportFrom) and any(a.name == "Any" for a in node.names)
            if named or imported:
                mentions.append(f"{path.name}:{node.lineno}")  # type: ignore[attr-defined]
    assert mentions == []


class _Inner(msgspec.Struct):
    ok: int
    hidden: dict[str, list[typing.Any]]


@dataclasses.dataclass
class _Holder:
    plain: typing.Any
    maybe: typing.Annotated[int | typing.Any, "meta"]


class _Outer(msgspec.Struct):
    inner: list[_Inner]
    holder: _Holder | None
    free: object
    fine: tuple[int, ...]


def test_the_any_walk_finds_any_however_deep() -> None:
    assert any_fields(_Outer) == [
        "_Inner.hidden[1][0]",
        "_Holder.plain",
        "_Holder.maybe[1]",
        "_Outer.free",
    ]
