"""Command line: `python -m dreambooth_ext convert|train|demo|ui ...`.

A UserError ends the command with its one sentence and exit code 1; anything else is a bug
and keeps its traceback.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import FAMILIES, choices_of


def _convert(args) -> int:
    from dreambooth_ext.bridge import diffusers_to_single_file, single_file_to_diffusers

    from dreambooth_ext.bridge.temporaries import remove_stale

    src, dst = Path(args.src), Path(args.dst)
    for stale in remove_stale(dst.parent, only=dst.name):  # what an earlier, killed conversion to DST left
        print(f"removed {stale.name}, left by a conversion that was stopped")
    if src.is_dir():
        if args.family != "auto":
            print("note: --family is read from the folder's own configs; the flag is ignored", file=sys.stderr)
        report = diffusers_to_single_file(src, dst, dtype=args.dtype, overwrite=args.overwrite, progress=print)
        print(f"wrote {report.path} ({report.family}, {report.tensors} tensors)")
        if report.yaml_path:
            print(f"wrote {report.yaml_path} (tells the WebUI this model's config)")
    else:
        report = single_file_to_diffusers(src, dst, family=args.family, dtype=args.dtype,
                                          overwrite=args.overwrite, progress=print)
        print(f"wrote {report.destination} ({report.family}, {report.prediction_type}, {report.tensors} tensors)")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _train(args) -> int:
    import signal

    from dreambooth_ext.train.config_cli import config_from_args
    from dreambooth_ext.train.reporter import ConsoleReporter
    from dreambooth_ext.train.run import train

    cfg = config_from_args(args)
    reporter = ConsoleReporter()

    def first_interrupt(signum, frame):
        # the first Ctrl-C finishes the step and saves the state; a second one stops at once
        reporter.stop_requested = True
        reporter.warn("stopping after this step (Ctrl-C again to abort without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first_interrupt)
    try:
        result = train(cfg, reporter)
    finally:
        signal.signal(signal.SIGINT, previous)
        reporter.close()
    if result.status == "cancelled":
        print(f"stopped at step {result.step}; run the same command again to resume")
        return 3
    for path in result.outputs:
        print(f"output: {path}")
    return 0


def _demo(args) -> int:
    from dreambooth_ext.demo import run_demo

    return run_demo(Path(args.out), Path(args.models_dir))


def _ui(args) -> int:
    from dreambooth_ext.host.standalone import serve

    serve(models_dir=args.models_dir, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_ext", description="DreamBooth for the Stable Diffusion WebUI")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="single file -> diffusers folder, or diffusers folder -> single file")
    conv.add_argument("src", help="a .safetensors/.ckpt checkpoint, or a diffusers folder")
    conv.add_argument("dst", help="a folder (from a file), or a .safetensors/.ckpt path (from a folder)")
    conv.add_argument("--family", choices=FAMILIES, default="auto",
                      help="model family; SD2 weights cannot tell epsilon from v-prediction: use sd2-v for 768-v models")
    conv.add_argument("--dtype", choices=choices_of("save_dtype"), default=None, help="cast float weights (default: keep)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    conv.set_defaults(run=_convert)

    from dreambooth_ext.train.config_cli import add_arguments

    tr = sub.add_parser("train", help="DreamBooth-train a checkpoint on your images (see --help)")
    add_arguments(tr)
    tr.set_defaults(run=_train)

    demo = sub.add_parser("demo", help="run the built-in demo on a tiny model (CPU, no downloads)")
    demo.add_argument("--out", default="out/demo", help="where the demo writes its grid, loss plot and figures.json")
    demo.add_argument("--models-dir", default="models", help="the models folder the checkpoint goes to")
    demo.set_defaults(run=_demo)

    ui = sub.add_parser("ui", help="serve the DreamBooth tab as a standalone page, without the WebUI")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: only this machine)")
    ui.add_argument("--port", type=int, default=7870, help="port to listen on")
    ui.add_argument("--models-dir", default="models",
                    help="models folder: checkpoints in its Stable-diffusion/, LoRAs in its Lora/")
    ui.set_defaults(run=_ui)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if "out of memory" not in str(e).lower():
            raise
        from dreambooth_ext.jobs import _explain

        print(f"error: {_explain(e)}", file=sys.stderr)
        return 1
