"""DreamBooth with LoRA on the shipped drawn base, read back from the written LoRA file the way the
WebUI's Lora extension adds it (tests/learning_helpers.py).

Measured as in test_learning_full.py (denoising loss, trained / base). Why LoRA at its defaults
(rank 16, lr 1e-4, the "attention" preset) barely learns here while it already disturbs other
captions: the tiny UNet has attention only at its 8x8 level and the middle, so attention adapters
cannot reach the resnets that draw colours and shapes (token x0.91 after 200 steps), and most of
what they change (self-attention, the cross-attention's keys and values of every prompt's tokens)
acts on all prompts alike (unrelated caption x1.10-1.13 already). With convolutions and feed-forward
layers adapted too ("attention_ff_conv", rank 8) at lr 3e-4, LoRA learns like full training.
Figures measured with training seeds 7, 8, 9 are in the comments.
"""

import pytest

from dreambooth_ext.train.placement import EMULATE_ENV
from tests import learning_helpers as L

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, drawn_base):
    return L.world(tmp_path_factory.mktemp("learn-lora"), drawn_base)


ratios = L.ratios


@pytest.fixture(scope="module")
def recommended(world):
    return ratios(world, "recommended", **L.LORA)


def test_recommended_lora_learns_the_token_where_the_default_preset_barely_does(world, recommended):
    default = ratios(world, "default", train_mode="lora", max_steps=L.LORA["max_steps"])
    assert recommended[L.TOKEN] < 0.65  # measured 0.50-0.51
    assert recommended[L.UNRELATED] < 2.2  # measured 1.77-1.82
    assert recommended[L.CLASS] < 1.8  # measured 1.41-1.49
    assert default[L.TOKEN] > 0.75  # measured 0.91: the attention preset barely reaches the concept


def test_the_gpu_dtype_layout_learns_as_fp32_does(world, recommended, monkeypatch):
    """LoRA under the CPU's stand-in for a GPU's layout: the base frozen in bf16, adapters fp32."""
    monkeypatch.setenv(EMULATE_ENV, "bf16")
    gpu_layout = ratios(world, "recommended-bf16", **L.LORA)
    assert gpu_layout[L.TOKEN] < 1.15 * recommended[L.TOKEN]  # measured (seed 7): 0.499 against 0.500
    assert gpu_layout[L.UNRELATED] < 2.2  # measured 1.83
