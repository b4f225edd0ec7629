"""Adds missing packages the DreamBooth extension needs; never changes one the WebUI installed.

Run by the WebUI with its own Python at start-up, or by hand. An installed package outside the
supported range gets one warning line and is left alone. torch and xformers belong to the WebUI.
"""
import importlib.metadata
import os
import subprocess
import sys
import tempfile

# (distribution name, what to install when it is missing, supported range: min <= version < max)
PACKAGES = [
    ("diffusers", "diffusers==0.31.0", ("0.31", "0.32")),  # Forge pins 0.31.0; A1111 has none
    ("peft", "peft==0.12.0", ("0.12", "0.14")),  # 0.12 suits A1111's accelerate 0.21; Forge pins 0.13.2
    ("safetensors", "safetensors==0.4.2", ("0.4.2", "1")),  # both WebUIs pin 0.4.2
]
# Held at their installed versions (a pip constraints file) while we add packages, so a dependency
# of ours can never upgrade or downgrade what the WebUI pinned.
PROTECTED = ["torch", "torchvision", "xformers", "gradio", "transformers", "accelerate",
             "safetensors", "numpy", "fastapi", "pydantic"]


def version_tuple(text):
    """'0.13.2' -> (0, 13, 2); stops at the first part that is not a plain number ('2.1.2+cu121')."""
    parts = []
    for part in text.replace("+", ".").replace("-", ".").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def installed_versions(names):
    """Maps each installed distribution in names to its version; missing ones are left out."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def plan(installed, packages=PACKAGES):
    """Returns (specs to install, warning lines). Installed packages are never in the specs."""
    to_add, warnings = [], []
    for name, spec, (low, high) in packages:
        if name not in installed:
            to_add.append(spec)
        elif not version_tuple(low) <= version_tuple(installed[name]) < version_tuple(high):
            warnings.append(f"[dreambooth] {name} {installed[name]} is installed; the extension "
                            f"supports >={low},<{high}. Leaving it as it is.")
    return to_add, warnings


def pip_install(spec, constraints_path):
    try:
        import launch  # the WebUI's launcher module; importable when the WebUI runs this file
    except ImportError:
        launch = None
    if hasattr(launch, "run_pip"):
        launch.run_pip(f'install {spec} -c "{constraints_path}"', f"{spec} for the DreamBooth extension")
    else:
        subprocess.run([sys.executable, "-m", "pip", "install", spec, "-c", constraints_path], check=True)


def main(argv):
    if "--skip-install" in argv:
        return
    to_add, warnings = plan(installed_versions([name for name, _, _ in PACKAGES]))
    for line in warnings:
        print(line)
    if not to_add:
        return
    pins = "".join(f"{name}=={version}\n" for name, version in installed_versions(PROTECTED).items())
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(pins)
    try:
        for spec in to_add:
            print(f"[dreambooth] adding {spec}")
            pip_install(spec, constraints.name)
    finally:
        os.remove(constraints.name)


if __name__ == "__main__":
    main(sys.argv[1:])
