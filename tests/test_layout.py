"""The package keeps its layout rules (scripts/check_layout.py): no import cycle, imports inside functions included;
no module over 500 lines; no function over 80."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_keeps_its_layout_rules():
    assert _checker().problems(ROOT / "llmprune") == []


def test_the_checker_sees_a_cycle_inside_a_function_and_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n" + "    x = 1\n" * 80)
    found = _checker().problems(pkg)
    assert any("import cycle: pkg.a <-> pkg.b" in p for p in found) and any(" f: 82 lines" in p for p in found)
