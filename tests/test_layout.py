"""The README's layout is the code's: every module listed once, and imports flowing down the list."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "omnigpt"


def _listed_modules() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout") :]
    tree = section[section.index("src/omnigpt/") : section.index("benchmarks/")]
    return re.findall(r"^  (\S+\.py)", tree, flags=re.M)


def _imported(module: str) -> set[str]:
    """The package's modules that `module` imports, as paths like the README's ("model/gpt.py")."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / module).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("omnigpt."):
            parts = node.module.split(".")[1:]
            if parts == ["model"]:  # the package's face hands on the decoder and its blocks
                found |= {"model/gpt.py", "model/attention.py"}
            else:
                found.add("/".join(parts) + ".py")
    return found - {module}


def test_every_module_is_listed_once():
    listed = _listed_modules()
    assert len(listed) == len(set(listed))
    actual = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert set(listed) == actual


def test_imports_flow_down_the_list():
    listed = _listed_modules()
    for i, module in enumerate(listed):
        above = set(listed[:i])
        assert _imported(module) <= above, f"{module} imports {_imported(module) - above}"
