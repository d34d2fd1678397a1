"""The package layout follows the pipeline: each subpackage imports only the ones below it, and no module imports
itself back through another (imports inside functions included)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ldmscale"
# bottom to top; "core" is the top-level modules (config, errors, io, device, progress, checkpoint, images)
ORDER = ["core", "model", "data", "diffusion", "train", "tasks", "eval", "study", "analysis", "cli"]


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else "core"


def _imports(path: Path) -> set[str]:
    """Every ldmscale module this file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ldmscale":
            for a in node.names:  # `from ldmscale.eval import metrics` imports the module ldmscale.eval.metrics
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ldmscale"}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) - {_module(p)} for p in PKG.rglob("*.py") if p.name != "__main__.py"}


def test_subpackages_import_only_what_is_below_them():
    bad = [
        f"{m} ({_layer(m)}) imports {d} ({_layer(d)})"
        for m, deps in _graph().items()
        for d in deps
        if ORDER.index(_layer(d)) > ORDER.index(_layer(m))
    ]
    assert not bad, "\n".join(bad)
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ORDER) - {"core"}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_command_line_starts_without_torch():
    """`ldmscale --help` and every verb's options load only the light modules (configs, cli/): the heavy imports of
    the modules a command needs stay inside it, so a mistyped option answers at once."""
    import subprocess
    import sys

    code = (
        "import sys; from ldmscale.cli.main import MODULES, register; register(*MODULES); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
