"""DreamBooth, full training, on the shipped drawn base: the token is learned, the prior holds the class.

Measured on the checkpoint the trainer wrote, read back through the bridge, as how well the model
knows pictures by a prompt: the denoising loss at fixed timesteps and noise (dreambooth_ext.evaluate),
trained / base, for the instance pictures under the token prompt, the base's own drawn pictures
under "a character" (the class) and under "a red circle" (an unrelated caption).
Figures measured with training seeds 7, 8, 9 are in the comments; thresholds keep a margin.
The tiny base reads its prompt weakly, so what one prompt learns leaks into the others: unrelated
captions drift (x1.6-1.8), and that drift is bounded here rather than claimed small.
"""

import pytest

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
    assert with_prior[L.TOKEN] < 0.5  # measured 0.34-0.35: the instances are learned under the token
    assert with_prior[L.UNRELATED] < 2.2  # measured 1.65-1.76


def test_prior_preservation_holds_the_class_where_lambda_0_lets_it_go(world, with_prior):
    without = ratios(world, "lambda0", prior_loss_weight=0.0)
    assert without[L.TOKEN] < 0.5  # measured 0.31-0.32
    # measured: the class loss rises x1.29-1.48 with lambda 1, x1.97-2.15 with lambda 0 (ratio >= 1.35)
    assert with_prior[L.CLASS] < 1.6
    assert without[L.CLASS] > 1.25 * with_prior[L.CLASS]
