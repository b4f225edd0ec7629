"""The demo's base: an installed copy from an earlier build is replaced, and its class images are the base's own."""

from dreambooth_ext.demo import demo_config
from dreambooth_ext.tiny_base import NAME, SHIPPED, install, is_current, short_hash


def test_an_installed_base_from_an_earlier_build_is_not_current(tmp_path):
    dest = tmp_path / "Stable-diffusion" / f"{NAME}.safetensors"
    assert not is_current(dest)
    install(dest)
    assert is_current(dest)
    data = bytearray(dest.read_bytes())
    data[-1] ^= 1  # another build: same size, other weights
    dest.write_bytes(bytes(data))
    assert not is_current(dest)
    install(dest)
    assert is_current(dest) and dest.read_bytes() == SHIPPED.read_bytes()
    dest.with_suffix(".yaml").unlink()
    assert not is_current(dest)


def test_the_demo_keeps_class_images_per_base(tmp_path):
    other = tmp_path / "other.safetensors"
    data = bytearray(SHIPPED.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    shipped_dir = demo_config(tmp_path / "models", SHIPPED).concepts[0].class_dir
    other_dir = demo_config(tmp_path / "models", other).concepts[0].class_dir
    assert shipped_dir != other_dir and shipped_dir.endswith(short_hash(SHIPPED))
