"""javascript/dreambooth.js under node with a stand-in page: it polls while a job runs, and once a job that
ran while the page was open has written a checkpoint, it presses the WebUI's own checkpoint refresh button."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dreambooth_ext.ui.handlers import View
from dreambooth_ext.ui.render import view_html

SCRIPT = Path(__file__).resolve().parents[1] / "javascript" / "dreambooth.js"

HARNESS = r"""
const fs = require("fs");
const state = {running: false, written: ""};
const clicks = [];
const page = {
  querySelector(sel) {
    if (sel === "#dreambooth_poll") return {tagName: "BUTTON", click: () => clicks.push("poll")};
    if (sel === "#dreambooth_status .dreambooth-running") return state.running ? {} : null;
    if (sel === "#dreambooth_status [data-dreambooth-written]")
      return state.written ? {getAttribute: () => state.written} : null;
    if (sel === "#refresh_sd_model_checkpoint") return {click: () => clicks.push("refresh")};
    return null;
  },
};
global.window = global;
global.gradioApp = () => page;
let tick = null;
global.setInterval = (fn) => { tick = fn; return 1; };
const [scriptPath, stepsJson] = process.argv.slice(-2);
eval(fs.readFileSync(scriptPath, "utf8"));
const steps = JSON.parse(stepsJson);
const seen = [];
for (const [running, written] of steps) {
  state.running = running; state.written = written;
  clicks.length = 0;
  tick();
  seen.push(clicks.slice());
}
console.log(JSON.stringify(seen));
"""


def run_page(steps):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    out = subprocess.run([node, "-e", HARNESS, "--", str(SCRIPT), json.dumps(steps)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_finished_job_refreshes_the_webuis_dropdown_once():
    seen = run_page([[False, ""], [True, ""], [True, ""], [False, "7:1"], [False, "7:1"], [True, ""], [False, "8:2"]])
    assert seen == [["poll"], ["poll"], ["poll"], ["refresh"], [], ["poll"], ["refresh"]]


def test_a_job_that_ended_before_the_page_opened_needs_nothing():
    assert run_page([[False, "7:1"], [False, "7:1"]]) == [["poll"], []]


def test_the_status_line_carries_what_an_ended_job_wrote():
    line = view_html(View(key="k", running=False, status="finished", written="7:1"))
    assert 'data-dreambooth-written="7:1"' in line
    assert "data-dreambooth-written" not in view_html(View(key="k", running=True, status="running"))
