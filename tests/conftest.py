import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ["sd1", "sd2", "sd2-v", "sdxl"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One tiny single-file checkpoint (with beside-yaml) per family, built once per session."""
    from dreambooth_ext.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = write_tiny_checkpoint(family, root / family / f"tiny-{family}.safetensors", seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def drawn_base(tmp_path_factory):
    """The shipped tiny drawn base (dreambooth_ext/data/tiny_base), installed once per session."""
    from dreambooth_ext.tiny_base import install

    return install(tmp_path_factory.mktemp("drawn") / "Stable-diffusion" / "tiny-sd1-drawn.safetensors")
