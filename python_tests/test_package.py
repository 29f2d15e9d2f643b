"""Package-level guarantees: imports never touch CUDA, the extension is optional, info runs, one source list."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **env_overrides)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_import_does_not_initialize_cuda():
    code = (
        "import torch, facm_ext, facm_ext.ops\n"
        "facm_ext.ops.load_all()\n"
        "import facm_ext.jvp, facm_ext.models\n"
        "assert not torch.cuda.is_initialized(), 'importing facm_ext initialized CUDA'\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_ops_work_without_compiled_extension():
    """With facm_ext._C unimportable, every op still runs (plain-PyTorch path) and info says why."""
    code = (
        "import sys, builtins\n"
        "real_import = builtins.__import__\n"
        "def blocked(name, *a, **k):\n"
        "    if name == 'facm_ext._C' or (name == 'facm_ext' and a and a[2] and '_C' in a[2]):\n"
        "        raise ImportError('blocked for the test')\n"
        "    return real_import(name, *a, **k)\n"
        "builtins.__import__ = blocked\n"
        "import importlib\n"
        "orig = importlib.import_module\n"
        "def blocked_module(name, *a, **k):\n"
        "    if name == 'facm_ext._C':\n"
        "        raise ImportError('blocked for the test')\n"
        "    return orig(name, *a, **k)\n"
        "importlib.import_module = blocked_module\n"
        "import torch, facm_ext\n"
        "from facm_ext import _extension\n"
        "assert _extension.load() is False and 'blocked' in _extension.load_error()\n"
        "from facm_ext.ops import layer_norm_jvp\n"
        "x = torch.randn(2, 3, 8); y, ty = layer_norm_jvp(x, torch.randn_like(x))\n"
        "assert y.shape == x.shape and ty.shape == x.shape\n"
        "from facm_ext.info import collect, format_report\n"
        "report = format_report(collect())\n"
        "assert 'NOT loaded' in report, report\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_info_lists_every_public_op():
    result = _run_python("import runpy; runpy.run_module('facm_ext.info', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    import facm_ext.ops

    for name in facm_ext.ops.__all__:
        assert name in result.stdout, f"{name} missing from python -m facm_ext.info"
    assert "reference" in result.stdout


def test_source_list_entries_exist():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    sources = [ln.split("#", 1)[0].strip() for ln in lines]
    sources = [s for s in sources if s and not s.startswith("[")]
    assert sources, "csrc/sources.txt lists no sources"
    missing = [s for s in sources if not (ROOT / s).is_file()]
    assert not missing, f"csrc/sources.txt lists missing files: {missing}"
    # every kernel source in csrc/ is listed (a .cu nobody builds is dead code)
    listed = set(sources)
    unlisted = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp")
                and str(p.relative_to(ROOT)) not in listed]
    assert not unlisted, f"sources not in csrc/sources.txt: {unlisted}"


def test_package_module_jvp_is_callable():
    import facm_ext

    assert callable(facm_ext.jvp)
    assert callable(facm_ext.register_jvp_rule)


@pytest.mark.parametrize("attr", ["nonexistent_thing"])
def test_unknown_attribute_errors(attr):
    import facm_ext

    with pytest.raises(AttributeError):
        getattr(facm_ext, attr)
