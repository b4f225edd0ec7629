"""install.py in a virtual environment holding the WebUI's pins: it adds what is missing and changes no pin.

The environment is layered so it takes seconds, not a 3 GB torch download: a fresh venv whose .pth file
adds a folder of links to this test environment's packages (the WebUI's pins: torch, gradio, transformers,
accelerate, safetensors, numpy, fastapi...) minus diffusers and peft. pip sees those as installed, and the
packages it adds land in the fresh venv only; anything outside the venv's prefix is never uninstalled by pip.
install.py then really runs pip (PyPI must be reachable), and `pip freeze` is compared before and after.
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_PY = ROOT / "install.py"
OURS = {"diffusers", "peft"}  # what install.py adds on A1111 (requirements/webui.txt marks them as ours)
# The WebUI's pins (requirements_versions.txt, both hosts) and what the WebUI's launcher installs itself.
PINNED = ["torch", "gradio", "transformers", "accelerate", "safetensors", "numpy", "fastapi", "pydantic"]


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(python, *args, timeout=300):
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=python.parent)  # no launch.py there: install.py calls pip itself


def freeze(python) -> dict:
    out = _run(python, "-m", "pip", "freeze", "--all")
    assert out.returncode == 0, out.stderr
    pairs = [line.split("==", 1) for line in out.stdout.splitlines() if "==" in line]
    return {name.lower().replace("_", "-"): version for name, version in pairs}


@pytest.fixture(scope="module")
def webui_venv(tmp_path_factory):
    """A venv that sees this environment's packages except diffusers and peft; returns its python."""
    tmp = tmp_path_factory.mktemp("pins")
    base = tmp / "webui_site_packages"
    base.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].lower() not in OURS:
            (base / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    python = tmp / "venv" / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # addsitedir, not a bare path line, so .pth files among the linked packages are honoured too
    Path(purelib, "webui_pins.pth").write_text(f"import site; site.addsitedir({str(base)!r})\n")
    return python


def test_install_adds_only_what_is_missing_and_keeps_every_pin(webui_venv):
    before = freeze(webui_venv)
    assert not OURS & set(before)
    missing_pins = [name for name in PINNED if name not in before]
    assert not missing_pins, f"the test environment lacks the WebUI pins {missing_pins}"

    result = _run(webui_venv, str(INSTALL_PY))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours = [line for line in result.stdout.splitlines() if line.startswith("[dreambooth]")]
    assert ours == ["[dreambooth] adding diffusers==0.31.0", "[dreambooth] adding peft==0.12.0"]

    after = freeze(webui_venv)
    changed = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert changed == {}, f"install.py changed installed packages: {changed}"
    assert {name: after[name] for name in set(after) - set(before)} == {"diffusers": "0.31.0", "peft": "0.12.0"}

    # what was added works with the pins as they are
    check = _run(webui_venv, "-c", "import diffusers, peft, accelerate, transformers; "
                 "print(diffusers.__version__, peft.__version__, accelerate.__version__, transformers.__version__)")
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split() == ["0.31.0", "0.12.0", before["accelerate"], before["transformers"]]


def test_second_start_makes_no_pip_call(webui_venv):
    _run(webui_venv, str(INSTALL_PY))  # first start (a no-op when the test above ran)
    before = freeze(webui_venv)
    result = _run(webui_venv, str(INSTALL_PY))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "pip" not in result.stderr.lower()
    assert freeze(webui_venv) == before
