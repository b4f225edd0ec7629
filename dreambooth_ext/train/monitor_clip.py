"""CLIP scores for the training monitor, as the DreamBooth paper evaluates a subject's generations.

- CLIP-I: mean cosine similarity of CLIP image embeddings, every generation against every instance image;
- CLIP-T: mean cosine similarity of each generation to a text (the instance prompt without its token);
- class similarity: CLIP-I of each class-prompt generation to the base model's for the same seed (1 = unchanged).

The model comes from a folder on disk (setting `monitor_clip_model`), read with transformers' CLIPModel,
never downloaded. It is loaded once per run, kept in eval mode without gradients, and sits on the
sample device only while it scores (between sample steps it waits on the CPU, out of training's memory).
"""

import contextlib
import json
import re
from pathlib import Path
from typing import List, Sequence

from dreambooth_ext.errors import UserError

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
BATCH = 16  # pictures per forward pass


def check_clip_folder(path: str) -> Path:
    """The folder of a full CLIP model (vision and text), or UserError with one sentence; reads only small files."""
    folder = Path(path).expanduser()
    what = f"Setting 'monitor_clip_model' is {path!r}"
    if not folder.is_dir():
        raise UserError(f"{what}, which is not a folder; give the folder of a CLIP model on disk (with its "
                        "config.json), or leave it empty to monitor with latent distances only.")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{what}, a folder without a readable config.json; give the folder of a CLIP model saved "
                        "by transformers, such as a snapshot of openai/clip-vit-large-patch14.") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "clip":
        raise UserError(f"{what}, which holds a {kind or 'model of no stated type'}, not a full CLIP model (vision "
                        "and text, model_type 'clip'); the monitor needs both for CLIP-I and CLIP-T.")
    if not any((folder / name).is_file() for name in WEIGHTS):
        raise UserError(f"{what}, which has no weights ({' or '.join(WEIGHTS[:2])}); copy the whole model folder.")
    if not (folder / "preprocessor_config.json").is_file():
        raise UserError(f"{what}, which has no preprocessor_config.json (how pictures are sized for the model); "
                        "copy the whole model folder.")
    return folder


def text_without_token(instance_prompt: str, class_prompt: str, token: str = "") -> str:
    """The text CLIP-T compares generations with: the instance prompt with its token taken out ('a photo of
    sks dog' -> 'a photo of dog'); the class prompt when no token is found; else the prompt itself."""
    from dreambooth_ext.train.config_checks import _looks_rare, _words

    if token.strip():
        tokens = [token.strip()]
    else:
        class_words = set(_words(class_prompt))
        tokens = [w for w in _words(instance_prompt) if w not in class_words and _looks_rare(w)]
    text = instance_prompt
    for t in tokens:
        text = re.sub(rf"(?<!\w){re.escape(t)}(?!\w)", " ", text, flags=re.IGNORECASE)
    text = " ".join(text.split()).replace(" ,", ",").strip(", ")
    if tokens and text and text != " ".join(instance_prompt.split()):
        return text
    return class_prompt.strip() or instance_prompt.strip()


def mean_pairwise(a, b) -> float:
    """Mean cosine similarity of every row of `a` with every row of `b` (both unit length)."""
    return float((a @ b.T).mean().clamp(-1, 1))


def mean_paired(a, b) -> float:
    """Mean cosine similarity of rows of the same index (the same seed)."""
    return float((a * b).sum(dim=1).mean().clamp(-1, 1))


class ClipScorer:
    def __init__(self, folder: str, device):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from dreambooth_ext.tokenizer_files import load_tokenizer

        folder = check_clip_folder(folder)
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
            self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
            self.tokenizer = (CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
                              if any((folder / n).is_file() for n in TOKENIZER_FILES) else load_tokenizer())  # all CLIP models share the shipped one
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"The CLIP model in {folder} (setting 'monitor_clip_model') could not be loaded: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}.") from None
        self.model.to(dtype=self.dtype)
        self.max_length = min(int(self.model.config.text_config.max_position_embeddings),
                              int(self.tokenizer.model_max_length))

    @contextlib.contextmanager
    def on_device(self):
        """The model on the sample device for a measurement's scoring; back on the CPU afterwards (between
        sample steps a GPU's memory is training's)."""
        self.model.to(self.device)
        try:
            yield
        finally:
            if self.device.type != "cpu":
                self.model.to("cpu")

    def _where(self):
        return next(self.model.parameters()).device

    def images(self, pictures: Sequence) -> "torch.Tensor":  # noqa: F821
        """Unit-length image embeddings of PIL pictures, float32 on the CPU: [N, D]."""
        import torch

        out = []
        for i in range(0, len(pictures), BATCH):  # 50 instance pictures need not be one batch
            batch = [p.convert("RGB") for p in pictures[i:i + BATCH]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out.append(self.model.get_image_features(pixel_values=pixels.to(self._where(), self.dtype)).float())
        return torch.nn.functional.normalize(torch.cat(out).cpu(), dim=-1)

    def texts(self, texts: List[str]) -> "torch.Tensor":  # noqa: F821
        """Unit-length text embeddings, float32 on the CPU: [N, D]."""
        import torch

        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self._where()),
                                               attention_mask=tokens["attention_mask"].to(self._where()))
        return torch.nn.functional.normalize(out.float().cpu(), dim=-1)

