"""Import a script of ``benchmarks/`` (not a package) as a module, for the tests of its harness."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, alias: str = ""):
    """``benchmarks/<name>.py`` as a module named ``alias`` (default ``name``)."""
    spec = importlib.util.spec_from_file_location(alias or name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
