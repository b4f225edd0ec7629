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
    """Every ModelBundle the trainer loads, in order (the one place that knows how a run loads its models).

    Without monkeypatch (a worker process of its own), the hook stays for the process's life."""
    import dreambooth_ext.train.run as run_module

    bundles = []
    real = run_module.load_bundle

    def hook(*args, **kwargs):
        bundles.append(real(*args, **kwargs))
        return bundles[-1]

    if monkeypatch is None:
        run_module.load_bundle = hook
    else:
        monkeypatch.setattr(run_module, "load_bundle", hook)
    return bundles


def count_class_images(folder) -> int:
    """Images in `folder` that decode; 0 when the folder does not exist yet."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return len(list_images(folder)[0])
