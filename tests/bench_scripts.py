"""bench/'s scripts as modules, for the tests that call their functions (bench/ is a folder of scripts, not a package)."""
import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """bench/<name>.py imported under the module name `name` (a fresh module on every call)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
