"""legonet as a real package: `pip install .` (no -e) into a fresh virtual environment, then `legonet init` and
`legonet build` on the tiny project, with nothing of the checkout on the path.

The environment sees the system's packages (torch, DVC, MLflow: nothing is downloaded), but legonet itself comes
from the wheel pip builds from a copy of the checkout. A line appended to the installed `stages/__init__.py`
records every import of the stages package, so the test sees that the stage processes DVC starts
(`python -m stages.X`) ran the installed code, not the checkout's and not the editable install's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import init_args

REPO = Path(__file__).resolve().parents[1]


def checkout_copy(dst: Path) -> Path:
    """The files git would commit (tracked or new, not ignored), symlinks kept: what a clean clone holds."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if not src.is_symlink() and not src.exists():  # deleted in the work tree, not yet in git
            continue
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dst


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A venv with legonet installed from a wheel of the checkout; an environment without the checkout in it."""
    home = tmp_path_factory.mktemp("package")
    source = checkout_copy(home / "source")
    venv = home / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], home, env)
    python = venv / "bin" / "python"
    # the system's pip, run by the venv's interpreter, installs into the venv; --no-deps: no download
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", source], home, env)
    located = run([python, "-c", "import pipeline, stages; print(pipeline.__file__); print(stages.__file__)"],
                  home, env).split()
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], home, env).strip())
    marker = home / "stage-imports.txt"
    with open(site / "stages" / "__init__.py", "a") as handle:  # the sentinel (module docstring)
        handle.write("\nimport os as _os\n"
                     "with open(_os.environ['LEGONET_STAGE_IMPORTS'], 'a') as _f:\n"
                     "    _f.write(__file__ + '\\n')\n")
    return {"venv": venv, "site": site, "located": located, "marker": marker,
            "env": {**env, "LEGONET_STAGE_IMPORTS": str(marker)}}


def test_installed_package_is_the_wheel_not_the_checkout(installed: dict[str, object]) -> None:
    site = installed["site"]
    assert isinstance(site, Path)
    for path in installed["located"]:  # type: ignore[attr-defined]
        assert Path(path).is_relative_to(site), f"{path} is not the venv's copy (site-packages {site})"
    template = site / "pipeline" / "project" / "template"
    for name in ("dvc.yaml", "params.yaml"):  # real files in the wheel, the root files' bytes
        assert not (template / name).is_symlink()
        assert (template / name).read_bytes() == (REPO / name).read_bytes()


def test_version(installed: dict[str, object]) -> None:
    venv, env = installed["venv"], installed["env"]
    assert isinstance(venv, Path) and isinstance(env, dict)
    out = run([venv / "bin" / "legonet", "--version"], venv, env)
    expected = run([venv / "bin" / "python", "-c", "import importlib.metadata as m; print(m.version('legonet'))"],
                   venv, env).strip()
    assert out.strip() == f"legonet {expected}"


def test_init_and_build_from_the_installed_package(installed: dict[str, object], tiny_data: Path,
                                                   tmp_path: Path) -> None:
    venv, env, marker, site = installed["venv"], installed["env"], installed["marker"], installed["site"]
    assert isinstance(venv, Path) and isinstance(env, dict) and isinstance(marker, Path) and isinstance(site, Path)
    legonet = venv / "bin" / "legonet"  # not activated: PATH still finds the system's python first
    run([legonet, *init_args(tiny_data)], tmp_path, env)
    assert (tmp_path / "dvc.yaml").read_bytes() == (REPO / "dvc.yaml").read_bytes()
    marker.unlink(missing_ok=True)
    out = run([legonet, "build"], tmp_path, env)
    assert "registered model version 1 aliases [champion]" in out, out
    assert (tmp_path / "models" / "package" / "MLmodel").is_file()
    imports = marker.read_text().split()
    assert imports, "no stage process imported the installed stages package"
    assert all(Path(p).is_relative_to(site) for p in imports), imports
