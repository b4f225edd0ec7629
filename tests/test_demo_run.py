"""`./run.sh demo` as a user meets it: the base draws ordinary characters for the token, the trained model
draws the bundled character, and the class prompt still draws the base's characters.

What a sample "looks like" is the label of its nearest reference picture at 16x16 pixels
(dreambooth_ext.drawn.nearest_labels): the demo's instance pictures, or 8 drawn pictures of each
caption the base learned. Measured (6 seeds): token base 0 -> trained 6 the character; class
prompt 6 -> 5 hatted characters; "a red circle" 6 -> 1 red circle (it takes the instance
pictures' coloured backgrounds: drift the demo prints, not hides).
"""

import json

import pytest
import torch
from PIL import Image

from dreambooth_ext import demo, drawn
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.images import list_images, load_image

CHARACTERS = set(drawn.HAT_CAPTIONS) | {drawn.CLASS_CAPTION}


def test_pictures_are_labelled_by_their_nearest_reference():
    held = [(c, s) for c in drawn.CAPTIONS for s in range(40_000, 40_004)]
    labels = drawn.nearest_labels([drawn.draw(c, s) for c, s in held])
    # a picture at a new seed: a character is labelled a character, a shape gets its colour; the exact
    # caption is right for 49 of 68 (shapes vary in size and place, and "a character" wears any hat)
    assert [_kind(label) for label in labels] == [_kind(c) for c, _s in held]
    assert sum(label == c for label, (c, _s) in zip(labels, held)) >= 0.6 * len(held)
    paths = list_images(demo.DEMO_IMAGES)[0]
    instances = [load_image(p).resize((drawn.SIZE, drawn.SIZE)) for p in paths]
    labels = drawn.nearest_labels(instances[:3], {"character": instances[3:]})
    assert labels == ["character"] * 3  # unseen instance pictures: nearer the other instances than any caption


def _kind(caption: str) -> str:
    return "character" if caption in CHARACTERS else caption.split()[1]


@pytest.mark.slow
def test_the_demo_shows_the_token_learned_and_the_class_kept(tmp_path):
    threads = torch.get_num_threads()  # the demo trains on one thread unless OMP_NUM_THREADS says otherwise
    try:
        assert demo.run_demo(tmp_path / "out", tmp_path / "models") == 0
    finally:
        torch.set_num_threads(threads)
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    base, trained = figures["looks_like"][demo.TOKEN_PROMPT]
    assert demo.INSTANCE_LABEL not in base  # the base has never seen the character
    assert trained.count(demo.INSTANCE_LABEL) >= 4  # measured 6 of 6
    base, trained = figures["looks_like"][demo.CLASS_PROMPT]
    assert all(label in CHARACTERS for label in base)
    assert sum(label in CHARACTERS for label in trained) >= 4  # measured 5 of 6: prior preservation
    for name in (demo.GRID, demo.LOSS_PLOT):
        demo.check_outputs(tmp_path / "out")  # marked as the demo's: a second run may replace them
        assert Image.open(tmp_path / "out" / name).text[demo.MARK] == name
    assert (tmp_path / "models" / "Stable-diffusion" / f"sks_pixarstyle-demo_{demo.TRAIN['max_steps']}.safetensors").is_file()


@pytest.mark.parametrize("name,content", [
    (demo.FIGURES, b'{"my": "notes"}'), (demo.FIGURES, b"not json at all"), (demo.FIGURES, b"[1, 2]"),
    (demo.GRID, None), (demo.LOSS_PLOT, None), (demo.GRID, b"not a picture"),
])
def test_the_demo_does_not_replace_a_file_it_did_not_write(tmp_path, name, content):
    out = tmp_path / "out"
    out.mkdir()
    if content is None:  # a user's own picture under the demo's file name
        Image.new("RGB", (8, 8), "red").save(out / name)
        content = (out / name).read_bytes()
    else:
        (out / name).write_bytes(content)
    with pytest.raises(UserError, match=f"holds {name}, which the demo did not write"):
        demo.run_demo(out, tmp_path / "models")
    assert (out / name).read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert not (tmp_path / "models").exists()  # refused before any work


def test_an_out_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        demo.run_demo(tmp_path / "out", tmp_path / "models")
    assert (tmp_path / "out").read_text() == "mine"


def test_an_earlier_demos_files_may_be_replaced(tmp_path):
    (tmp_path / demo.FIGURES).write_text(json.dumps({key: {} for key in demo.FIGURE_KEYS}))
    demo.save_marked_png(Image.new("RGB", (8, 8)), tmp_path / demo.GRID)
    demo.save_marked_png(Image.new("RGB", (8, 8)), tmp_path / demo.LOSS_PLOT)
    demo.check_outputs(tmp_path)  # no refusal: the demo wrote them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([demo.FIGURES, demo.GRID, demo.LOSS_PLOT])
    # the mark names the file: a grid copied over the loss plot is not taken for it
    (tmp_path / demo.LOSS_PLOT).write_bytes((tmp_path / demo.GRID).read_bytes())
    with pytest.raises(UserError, match=f"holds {demo.LOSS_PLOT},"):
        demo.check_outputs(tmp_path)
