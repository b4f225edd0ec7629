"""The trainer runs data-parallel under `accelerate launch` without code changes (two CPU processes here)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import CLASS_PROMPT, DEMO, TOKEN_PROMPT

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    """A port nothing listens on now (two suites on one machine must not share a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*module_args: str) -> subprocess.CompletedProcess:
    port = _free_port()
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", *module_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_run_under_accelerate_launch(tiny_checkpoints, tmp_path):
    proc = _launch("dreambooth_ext", "train", "--checkpoint", str(tiny_checkpoints("sd1")),
                   "--instance-dir", str(DEMO), "--instance-prompt", TOKEN_PROMPT, "--class-prompt", CLASS_PROMPT,
                   "--num-class-images", "2", "--class-image-steps", "2", "--name", "ddp",
                   "--models-dir", str(tmp_path / "models"), "--steps", "4", "--resolution", "64", "--no-bucketing",
                   "--learning-rate", "1e-3", "--save-dtype", "fp32")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 processes" in log
    assert log.count("output: ") == 1  # only the main process writes
    out = tmp_path / "models" / "Stable-diffusion" / "ddp_4.safetensors"
    base = load_file(str(tiny_checkpoints("sd1")))
    trained = load_file(str(out))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not (trained[key] == base[key]).all()


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "gradient_checkpointing"])
def test_a_trained_text_encoder_stays_the_same_in_every_process(gc, tiny_checkpoints, tmp_path):
    """Each process sees other batches; only a synchronised encoder ends identical everywhere (and trained).

    With checkpointing, its layers (called for the instance and the class prompts) must get their gradient
    in one backward pass: reentrant checkpointing made DDP fail ("mark a variable ready only once")."""
    proc = _launch("tests.ddp_worker", str(tiny_checkpoints("sd1")), str(tmp_path), *(["gc"] if gc else []))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    first, second = (load_file(str(tmp_path / f"te_{rank}.safetensors")) for rank in (0, 1))
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    base = load_file(str(tiny_checkpoints("sd1")))
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(first[key], base["cond_stage_model.transformer." + key])
