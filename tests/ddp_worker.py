"""One process of a data-parallel run under `accelerate launch`, which afterwards writes the text
encoder it ended with to OUT/te_<rank>.safetensors, so a test can compare the processes' copies.

    accelerate launch --num_processes 2 ... -m tests.ddp_worker CHECKPOINT OUT [gc]

With "gc" the run uses gradient checkpointing (its text-encoder layers recomputed in the backward pass).
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from dreambooth_ext.train.run import train
from tests.trainer_helpers import capture_bundles, small_config


def main(checkpoint: str, out: str, gc: bool = False) -> None:
    bundles = capture_bundles()
    cfg = small_config(Path(out), checkpoint, name="ddp_te", text_encoder_mode="full", text_encoder_lr=1e-3,
                       max_steps=4, gradient_accumulation_steps=2, gradient_checkpointing=gc)
    train(cfg)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().cpu().contiguous() for k, v in bundles[0].text_encoders[0].state_dict().items()}
    save_file(state, str(Path(out) / f"te_{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["gc"])
