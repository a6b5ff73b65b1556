"""What `pip install equiray` puts on a Python path: the library `equiray` and the pipelines as `equiray_pipelines`
(the repository's `pipelines/` folder under a name of equiray's own), and no top-level `pipelines`."""
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _listed() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_installed_under_its_name():
    found = []
    for top, name in (("equiray", "equiray"), ("pipelines", "equiray_pipelines")):
        for init in sorted((REPO / top).rglob("__init__.py")):
            parts = init.parent.relative_to(REPO / top).parts
            found.append(".".join((name, *parts)))
    assert sorted(_listed()) == sorted(found)  # a new subpackage must be listed in pyproject.toml, or it is not installed


def test_the_pipelines_import_as_equiray_pipelines_and_nothing_installs_pipelines(tmp_path):
    # from outside the checkout (no folder named pipelines in the current directory)
    code = ("import importlib.util, equiray_pipelines, equiray_pipelines.serve; "
            "print(equiray_pipelines.__file__); print(importlib.util.find_spec('pipelines'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    where, pipelines = out.stdout.split()
    assert Path(where) == REPO / "pipelines" / "__init__.py"
    assert pipelines == "None"


def test_a_console_script_and_python_dash_m_reach_the_same_cli(tmp_path):
    script = Path(sys.executable).parent / "equiray"
    for argv in ([str(script), "--version"], [sys.executable, "-m", "equiray", "--version"],
                 [sys.executable, "-m", "equiray_pipelines.cli", "--version"]):
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("equiray "), (argv, out.stderr[-500:])
