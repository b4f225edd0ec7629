"""DreamBooth, full training, on the shipped drawn base: the token is learned, the prior holds the class.

Measured on the checkpoint the trainer wrote, read back through the bridge, as how well the model
knows pictures by a prompt: the denoising loss at fixed timesteps and noise (dreambooth_ext.evaluate),
trained / base, for the instance pictures under the token prompt, the base's own drawn pictures
under "a character" (the class) and under "a red circle" (an unrelated caption).
Figures measured with training seeds 7, 8, 9 are in the comments; thresholds keep a margin.
The base knows its own drawn pictures well (a low loss to start from), so what one prompt learns
shows as a large ratio on the others: the unrelated caption's loss doubles (x1.9-2.0) even with
prior preservation, which holds only the class; the demo's grid shows what that looks like (the
red circle stays a red circle, on the instances' coloured backgrounds).
"""

import pytest

from dreambooth_ext.train.placement import EMULATE_ENV
from tests import learning_helpers as L

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, drawn_base):
    return L.world(tmp_path_factory.mktemp("learn-full"), drawn_base)


def ratios(world, name, **overrides):
    return L.ratios(world, name, **{**L.FULL, **overrides})


@pytest.fixture(scope="module")
def with_prior(world):
    return ratios(world, "lambda1", prior_loss_weight=1.0)


def test_token_is_learned_and_unrelated_captions_drift_a_bounded_amount(with_prior):
    assert with_prior[L.TOKEN] < 0.45  # measured 0.30-0.31: the instances are learned under the token
    assert with_prior[L.UNRELATED] < 2.4  # measured 1.87-2.02


def test_prior_preservation_holds_the_class_where_lambda_0_lets_it_go(world, with_prior):
    without = ratios(world, "lambda0", prior_loss_weight=0.0)
    assert without[L.TOKEN] < 0.45  # measured 0.26-0.27
    # measured: the class loss rises x1.35-1.54 with lambda 1, x2.42-2.52 with lambda 0 (ratio 1.61-1.87)
    assert with_prior[L.CLASS] < 1.8
    assert without[L.CLASS] > 1.35 * with_prior[L.CLASS]


def test_the_gpu_dtype_layout_learns_as_fp32_does(world, with_prior, monkeypatch):
    """The CPU standing in for a GPU's layout (frozen modules bf16, bf16 autocast, fp32 master weights):
    a dtype mistake that only a GPU run makes shows here as a token learned less."""
    monkeypatch.setenv(EMULATE_ENV, "bf16")
    gpu_layout = ratios(world, "lambda1-bf16", prior_loss_weight=1.0)
    # measured (seed 7): token 0.307 with bf16 as in fp32, class 1.36 against 1.35; the UNet's master
    # weights kept in bf16 (updates smaller than bf16's step are lost) gave token 0.568
    assert gpu_layout[L.TOKEN] < 1.15 * with_prior[L.TOKEN]
    assert gpu_layout[L.CLASS] < 1.8
