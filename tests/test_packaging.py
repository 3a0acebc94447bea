"""The top-level folders export/, runtimes/, calibration/ install as vdit_deploy.* subpackages."""
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import vdit_deploy.calibration
import vdit_deploy.export
import vdit_deploy.runtimes

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("export", "runtimes", "calibration")


def test_editable_install_maps_the_stage_folders():
    for module, folder in zip((vdit_deploy.export, vdit_deploy.runtimes, vdit_deploy.calibration), STAGES):
        assert Path(module.__file__).resolve() == ROOT / folder / "__init__.py"


@pytest.mark.slow
def test_built_wheel_imports_the_stages(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("vdit_deploy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "vdit_deploy/export/__init__.py" in names and "vdit_deploy/runtimes/base.py" in names
    assert "vdit_deploy/compare/measure.py" in names   # a subpackage of vdit_deploy/ itself, listed too
    assert "vdit_deploy/assets/tiny/model.safetensors" in names
    assert not any(n.startswith(("export/", "runtimes/", "calibration/", "tests/")) for n in names)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    code = ("import vdit_deploy, vdit_deploy.export, vdit_deploy.runtimes, vdit_deploy.calibration as c; "
            "print(vdit_deploy.runtimes.__file__)")
    out = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(env_dir) in out and str(ROOT) not in out
