"""The trainer runs data-parallel under `accelerate launch` without code changes (two CPU processes here)."""

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.trainer_helpers import CLASS_PROMPT, DEMO, TOKEN_PROMPT


def test_two_process_run_under_accelerate_launch(tiny_checkpoints, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "dreambooth_ext", "train", "--checkpoint", str(tiny_checkpoints("sd1")),
           "--instance-dir", str(DEMO), "--instance-prompt", TOKEN_PROMPT, "--class-prompt", CLASS_PROMPT,
           "--num-class-images", "2", "--class-image-steps", "2", "--name", "ddp",
           "--models-dir", str(tmp_path / "models"), "--steps", "4", "--resolution", "64", "--no-bucketing",
           "--learning-rate", "1e-3", "--save-dtype", "fp32"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 processes" in log
    assert log.count("output: ") == 1  # only the main process writes
    out = tmp_path / "models" / "Stable-diffusion" / "ddp_4.safetensors"
    base = load_file(str(tiny_checkpoints("sd1")))
    trained = load_file(str(out))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not (trained[key] == base[key]).all()
