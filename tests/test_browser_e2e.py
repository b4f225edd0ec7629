"""End to end in a real browser: the standalone page, headless Debian Chromium driven by Playwright.

Fill a concept with the bundled demo images, train the built-in tiny model, watch progress and a
sample arrive, interrupt, resume, and find the finished model in the checkpoint list. Keeps
screenshots of the tab; DREAMBOOTH_SCREENSHOTS=docs/screenshots refreshes the README's copies
(otherwise they go to a temporary folder, so a test run leaves the work tree alone).
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dreambooth_ext" / "data" / "demo" / "instance"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 100  # at 64 px the tiny model does several steps a second: room to interrupt midway

if not Path(CHROMIUM).exists():
    pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (requirements/webui.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """The standalone page (`python -m dreambooth_ext ui`) in a subprocess, on a free port."""
    models, port = tmp_path_factory.mktemp("models"), free_port()
    log_path = tmp_path_factory.mktemp("log") / "ui.log"
    log = open(log_path, "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth_ext", "ui", "--port", str(port),
                             "--models-dir", str(models)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, f"the page did not start:\n{log_path.read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(log_path.read_text()[-4000:])  # shown by pytest when the test failed


def field(page, key: str):
    """The text or number input of a form field, whatever markup the gradio version gives it."""
    return page.locator(f"#dreambooth_{key}").locator("textarea, input[type=number], input:not([type])").first


def fill(page, key: str, value) -> None:
    box = field(page, key)
    box.fill(str(value))
    box.press("Tab")  # gradio 4 takes a number on blur


def open_accordion(page, elem_id: str) -> None:
    page.locator(f"#{elem_id} .label-wrap").first.click()


def text_of(page, name: str) -> str:
    # gradio 3 repeats an HTML component's elem_id on its inner element
    return page.locator(f"#dreambooth_{name}").first.inner_text()


def status(page) -> str:
    return text_of(page, "status")


def wait_status(page, pattern: str, seconds: float) -> re.Match:
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = re.search(pattern, status(page))
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"status never matched {pattern!r}; it says {status(page)!r}")


@pytest.fixture
def shots(tmp_path):
    folder = os.environ.get("DREAMBOOTH_SCREENSHOTS")
    return ROOT / folder if folder else tmp_path


def shot(page, folder: Path, name: str) -> None:
    """A 1280-wide viewport screenshot, reduced to 256 colours to keep the repository small."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)


def pick_checkpoint(page, title: str) -> None:
    page.locator("#dreambooth_checkpoint input").first.click()
    page.locator("#dreambooth_checkpoint li, ul.options li").filter(has_text=title).first.click()


def listed_checkpoints(page):
    page.locator("#dreambooth_checkpoint input").first.click()
    options = page.locator("#dreambooth_checkpoint li, ul.options li").all_inner_texts()
    page.keyboard.press("Escape")
    return [o.replace("\u2713", "").strip() for o in options]  # gradio 4 ticks the chosen one


def test_train_interrupt_resume_in_the_browser(page_url, shots):
    errors = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_url, wait_until="domcontentloaded")
        page.wait_for_selector("#dreambooth_train", timeout=60_000)
        wait_status(page, "Idle", 20)  # the first poll came back: javascript/dreambooth.js runs

        pick_checkpoint(page, "tiny-sd1.safetensors")
        fill(page, "name", "e2e")
        fill(page, "concept1_instance_dir", DEMO)
        fill(page, "concept1_instance_prompt", "a sks_pixarstyle character")
        fill(page, "concept1_class_prompt", "a pixar-style character")
        fill(page, "concept1_num_class_images", 2)
        fill(page, "resolution", 64)
        fill(page, "max_steps", STEPS)
        open_accordion(page, "dreambooth_group_class_images")
        fill(page, "class_image_steps", 2)
        open_accordion(page, "dreambooth_group_optimizer")
        fill(page, "learning_rate", "0.001")
        open_accordion(page, "dreambooth_group_samples")
        fill(page, "sample_every", 5)
        fill(page, "sample_steps", 2)
        fill(page, "num_sample_images", 1)
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, shots, "1-form")

        page.locator("#dreambooth_train").click()
        page.wait_for_function("() => document.querySelector('#dreambooth_message').innerText.includes('Training')",
                               timeout=20_000)
        first = int(wait_status(page, r"step (\d+)/", 90).group(1))
        page.wait_for_selector("#dreambooth_samples img", timeout=90_000)
        page.locator("#dreambooth_train").click()  # a second Train gets the runner's message
        page.wait_for_function(
            "() => document.querySelector('#dreambooth_message').innerText.includes('is training now')", timeout=10_000)
        later = int(wait_status(page, r"running.*step (\d+)/", 30).group(1))
        assert first <= later < STEPS, status(page)
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, shots, "2-training")

        page.locator("#dreambooth_interrupt").click()
        stopped = int(wait_status(page, r"cancelled.*step (\d+)/", 60).group(1))
        assert 0 < stopped < STEPS

        page.locator("#dreambooth_resume").click()
        page.wait_for_function("() => document.querySelector('#dreambooth_message').innerText.includes('saved step')",
                               timeout=20_000)
        assert f"from its saved step {stopped} " in text_of(page, "message")
        wait_status(page, rf"finished.*step {STEPS}/{STEPS}", 120)
        page.locator("#dreambooth_outputs").first.filter(has_text=f"e2e_{STEPS}.safetensors").wait_for(timeout=20_000)
        page.locator("#dreambooth_activate").wait_for(state="visible", timeout=10_000)
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, shots, "3-finished")
        assert f"e2e_{STEPS}.safetensors" in listed_checkpoints(page)
        assert page.locator("#dreambooth_checkpoint input").first.input_value() == "tiny-sd1.safetensors"
        page.locator("#dreambooth_activate").click()
        page.wait_for_function("() => document.querySelector('#dreambooth_message').innerText.includes('active')",
                               timeout=10_000)
        assert f"e2e_{STEPS}.safetensors is now the active checkpoint" in text_of(page, "message")
        browser.close()
    assert errors == []

