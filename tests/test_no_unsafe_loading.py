"""No code path of fedcare unpickles bytes: adapters, checkpoints and messages are
safetensors or JSON, `torch.load` runs only with `weights_only=True`, YAML only through
`safe_load`. Checked on the syntax tree of every module, so a comment or a string
that mentions pickle does not count, and a call spelt another way does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "common", "server", "simulations")
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve",
                      "marshal", "joblib"}
UNSAFE_CALLS = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all",
                "read_pickle"}  # yaml.*, pandas.read_pickle; torch/np.load are checked apart


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_loads(source: str) -> list[str]:
    """'line: what' for every import of an unpickling module and every unsafe load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            found += [f"{node.lineno}: imports {n}" for n in names
                      if n.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            name = node.func.attr
            if owner == "torch" and name == "load" and _keyword(node, "weights_only") is not True:
                found.append(f"{node.lineno}: torch.load without weights_only=True")
            elif owner in ("np", "numpy") and name == "load" \
                    and _keyword(node, "allow_pickle") is True:
                found.append(f"{node.lineno}: np.load with allow_pickle=True")
            elif owner in ("yaml", "pd", "pandas") and name in UNSAFE_CALLS:
                found.append(f"{node.lineno}: {owner}.{name}")
    return found


def test_the_checker_finds_each_unsafe_form():
    bad = ("import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)\n"
           "yaml.unsafe_load(s)\nnp.load(f, allow_pickle=True)\n")
    assert len(unsafe_loads(bad)) == 7
    good = ("import torch, yaml, numpy as np\ntorch.load(f, weights_only=True)\n"
            "yaml.safe_load(s)\nnp.load(f, allow_pickle=False)\n# pickle.loads(x)\n"
            "'yaml.load'\n")
    assert unsafe_loads(good) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_unpickles(package):
    problems = {str(path.relative_to(ROOT)): unsafe_loads(path.read_text(encoding="utf-8"))
                for path in sorted((ROOT / package).rglob("*.py"))}
    assert {k: v for k, v in problems.items() if v} == {}
