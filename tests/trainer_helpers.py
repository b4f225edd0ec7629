"""Shared set-up for trainer tests: a tiny SD1 base and small configs."""

from pathlib import Path

from dreambooth_ext.train.config import Concept, TrainConfig
from dreambooth_ext.train.images import list_images

DEMO = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "demo" / "instance"
TOKEN_PROMPT = "a sks_pixarstyle character"
CLASS_PROMPT = "a pixar-style character"


def small_config(tmp_path, checkpoint, **overrides) -> TrainConfig:
    """A config that trains the tiny model in seconds on a CPU."""
    concept = Concept(instance_dir=str(overrides.pop("instance_dir", DEMO)), instance_prompt=TOKEN_PROMPT,
                      class_prompt=overrides.pop("class_prompt", CLASS_PROMPT),
                      num_class_images=overrides.pop("num_class_images", 2))
    base = dict(checkpoint=str(checkpoint), name="tiny", models_dir=str(tmp_path / "models"), concepts=[concept],
                resolution=64, max_steps=6, learning_rate=1e-3, class_image_steps=2, bucketing=False,
                save_dtype="fp32", seed=7)
    base.update(overrides)
    return TrainConfig(**base)



def capture_bundles(monkeypatch=None) -> list:
    """Every ModelBundle the trainer loads, in order: a folder's (load_bundle) or a single file's built in
    memory (build_bundle); models.open_base calls them through the module, so one hook catches both.

    Without monkeypatch (a worker process of its own), the hooks stay for the process's life."""
    import dreambooth_ext.train.models as models

    bundles = []
    for name in ("load_bundle", "build_bundle"):
        real = getattr(models, name)

        def hook(*args, real=real, **kwargs):
            bundles.append(real(*args, **kwargs))
            return bundles[-1]

        if monkeypatch is None:
            setattr(models, name, hook)
        else:
            monkeypatch.setattr(models, name, hook)
    return bundles


def count_class_images(folder) -> int:
    """Images in `folder` that decode; 0 when the folder does not exist yet."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return len(list_images(folder)[0])


def with_one_nan(checkpoint: Path, out: Path, prefix: str) -> dict:
    """A copy of `checkpoint` (and its yaml) at `out` whose first float weight under `prefix` holds a NaN;
    returns the copy's tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint))
    key = next(k for k in tensors if k.startswith(prefix) and tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(out))
    shutil.copy(Path(checkpoint).with_suffix(".yaml"), Path(out).with_suffix(".yaml"))
    return tensors
