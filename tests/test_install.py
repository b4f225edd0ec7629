"""install.py only adds missing packages, and makes no pip call when nothing is missing."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_PY = ROOT / "install.py"

# A stand-in for the WebUI's `launch` module: any pip call through it leaves a marker file.
FAKE_LAUNCH = """
import pathlib
def run_pip(command, desc=None, live=True):
    pathlib.Path(__file__).with_name("pip_called.txt").write_text(command)
"""


def load_install():
    spec = importlib.util.spec_from_file_location("dreambooth_install", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_install(tmp_path, *args):
    (tmp_path / "launch.py").write_text(FAKE_LAUNCH)
    return subprocess.run(
        [sys.executable, str(INSTALL_PY), *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )


def test_no_pip_call_when_everything_is_installed(tmp_path):
    result = run_install(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "pip_called.txt").exists()
    assert "adding" not in result.stdout
    assert "[dreambooth]" not in result.stdout  # supported versions: not even a warning


def test_skip_install_does_nothing(tmp_path):
    result = run_install(tmp_path, "--skip-install")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "pip_called.txt").exists()


def test_main_never_reaches_pip_when_satisfied(monkeypatch):
    install = load_install()
    monkeypatch.setattr(install, "pip_install", lambda *a: pytest.fail(f"pip called with {a}"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("subprocess called"))
    install.main([])


A1111_WITHOUT_OURS = {"safetensors": "0.4.2", "torch": "2.1.2+cu121", "accelerate": "0.21.0"}


def test_plan_adds_only_what_is_missing():
    install = load_install()
    to_add, warnings = install.plan(A1111_WITHOUT_OURS)
    assert to_add == ["diffusers==0.31.0", "peft==0.12.0"]
    assert warnings == []


def test_plan_never_touches_installed_packages_even_when_unsupported():
    install = load_install()
    installed = {"diffusers": "0.25.0", "peft": "0.21.0", "safetensors": "0.4.2"}
    to_add, warnings = install.plan(installed)
    assert to_add == []
    assert len(warnings) == 2
    assert "diffusers 0.25.0" in warnings[0] and "peft 0.21.0" in warnings[1]


def test_plan_accepts_the_forge_pins():
    install = load_install()
    forge = {"diffusers": "0.31.0", "peft": "0.13.2", "safetensors": "0.4.2"}
    assert install.plan(forge) == ([], [])


def test_plan_never_installs_torch_or_xformers():
    install = load_install()
    to_add, _ = install.plan({})
    names = {name for name, _, _ in install.PACKAGES}
    assert not {"torch", "xformers", "torchvision"} & names
    assert not any(spec.startswith(("torch", "xformers")) for spec in to_add)


@pytest.mark.parametrize("text, expected", [
    ("0.13.2", (0, 13, 2)), ("2.1.2+cu121", (2, 1, 2)), ("0.32.0.dev0", (0, 32, 0)), ("1", (1,)),
])
def test_version_tuple(text, expected):
    assert load_install().version_tuple(text) == expected


def test_pip_goes_through_launch_with_constraints(tmp_path, monkeypatch):
    """When something is missing: one line per package, and the WebUI's pins are held by -c."""
    install = load_install()
    calls = []
    monkeypatch.setattr(install, "installed_versions",
                        lambda names: {n: v for n, v in A1111_WITHOUT_OURS.items() if n in names})
    monkeypatch.setattr(install, "pip_install",
                        lambda spec, path: calls.append((spec, Path(path).read_text())))
    install.main([])
    assert [spec for spec, _ in calls] == ["diffusers==0.31.0", "peft==0.12.0"]
    assert "torch==2.1.2+cu121\n" in calls[0][1] and "accelerate==0.21.0\n" in calls[0][1]
