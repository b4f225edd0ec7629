"""Every bad input of the hostile pass, tried through the CLI and the core, as a table.

Each row: the input, the exit code and the sentence the user sees, and what happened to the files
(anything the case set up that changed or vanished is "LOST"; new files outside the run's own
workspace are listed). The next hostile pass starts from this table: add a row by appending a
Case to CASES (a setup that builds the files, and a run that tries the input).

Usage: ./run.sh bench hostile_inputs [--only WORD]
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Case:
    name: str
    run: Callable[[Path], Tuple[int, str, str]]  # in a fresh folder with a tiny model: see `tried`


def _tiny(root: Path) -> Path:
    from dreambooth_ext.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint("sd1", root / "base" / "tiny.safetensors", seed=0)


def _images(root: Path) -> Path:
    demo = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "demo" / "instance"
    folder = root / "pictures"
    shutil.copytree(demo, folder)
    return folder


def cli(*argv: str) -> Tuple[int, str]:
    """Run the command line in this process; the last line it printed on stderr is what the user read."""
    from dreambooth_ext.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except BaseException as e:  # a traceback: exactly what the table is there to catch
            return -1, f"TRACEBACK {type(e).__name__}: {str(e)[:150]}"
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error: ")]
    lines = lines or (out.getvalue().strip().splitlines() or [""])
    return code, lines[-1]


def tried(root: Path, *argv: str) -> Tuple[int, str, str]:
    """The attempt itself: (exit code, what the user read, what happened to the files already there)."""
    before = snapshot(root)
    code, text = cli(*argv)
    return code, text, effects(before, snapshot(root))


def train_args(root: Path, *extra: str, name: str = "run") -> List[str]:
    return ["train", "--checkpoint", str(root / "base" / "tiny.safetensors"), "--instance-dir", str(root / "pictures"),
            "--instance-prompt", "a sks_pixarstyle character", "--name", name, "--models-dir", str(root / "models"),
            "--resolution", "64", "--steps", "2", "--num-class-images", "0", "--no-bucketing",
            "--class-image-steps", "2", *extra]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- the cases


def own_base_clash(root):
    sd = root / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    shutil.copy(root / "base" / "tiny.safetensors", sd / "mybase_2.safetensors")
    return tried(root, *train_args(root, name="mybase")[:2], str(sd / "mybase_2.safetensors"), *train_args(root, name="mybase")[3:])


def foreign_file_clash(root):
    sd = root / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    (sd / "run_2.safetensors").write_bytes(b"somebody else's model")
    return tried(root, *train_args(root))


def second_run_same_name(root):
    import socket

    lock = root / "models" / "dreambooth" / "run" / "run.lock"
    lock.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": time.time()}))
        return tried(root, *train_args(root))
    finally:
        other.kill()
        other.wait()


def stale_lock(root):
    import socket

    lock = root / "models" / "dreambooth" / "run" / "run.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0}))
    return tried(root, *train_args(root))


def class_is_instance(root):
    return tried(root, *train_args(root, "--class-prompt", "a pixar-style character", "--num-class-images", "2",
                           "--class-dir", str(root / "pictures")))


def long_name(root):
    return tried(root, *train_args(root, name="n" * 240))


def bad_resolution(root):
    return tried(root, *train_args(root, "--resolution", "72"))


def missing_checkpoint(root):
    args = train_args(root)
    args[2] = str(root / "nowhere.safetensors")
    return tried(root, *args)


def empty_instance_folder(root):
    shutil.rmtree(root / "pictures")
    (root / "pictures").mkdir()
    return tried(root, *train_args(root))


def corrupt_progress(root):
    cli(*train_args(root, "--steps", "4", "--save-state-every", "2"))
    (root / "models" / "dreambooth" / "run" / "state" / "progress.json").write_text("{broken")
    return tried(root, *train_args(root, "--steps", "6", "--save-state-every", "2"))


def resume_changed(root):
    cli(*train_args(root, "--steps", "2"))
    return tried(root, *train_args(root, "--steps", "4", "--learning-rate", "1e-3"))


def killed_between_renames(root):
    cli(*train_args(root, "--steps", "2"))
    state = root / "models" / "dreambooth" / "run" / "state"
    state.rename(state.with_name(f".state.previous-{_dead_pid()}"))
    return tried(root, *train_args(root, "--steps", "3"))


def stale_temporaries(root):
    sd = root / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    (sd / f".run_9.safetensors.partial-{_dead_pid()}").write_bytes(b"x" * 1000)
    code, text, files = tried(root, *train_args(root))
    left = [p.name for p in sd.iterdir() if ".partial-" in p.name]
    return code, f"{text} (temporaries left: {len(left)})", files


def nested_settings(root):
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    return tried(root, "train", "--config", str(root / "deep.json"))


def huge_integer(root):
    (root / "big.json").write_text('{"seed": ' + "9" * 5000 + "}")
    return tried(root, "train", "--config", str(root / "big.json"))


def folder_as_settings(root):
    return tried(root, "train", "--config", str(root / "pictures"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def malicious_pickle(root):
    with open(root / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Evil()}, f, protocol=2)
    return tried(root, "convert", str(root / "evil.ckpt"), str(root / "out"))


def nan_base(root):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / "base" / "tiny.safetensors"))
    key = next(k for k in tensors if k.startswith("model.diffusion_model.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(root / "base" / "tiny.safetensors"))
    return tried(root, *train_args(root))


def learning_rate_10(root):
    return tried(root, *train_args(root, "--learning-rate", "10", "--steps", "6"))


def non_utf8_name(root):
    odd = os.fsdecode(bytes(root) + b"/base/caf\xe9.safetensors")
    shutil.copy(root / "base" / "tiny.safetensors", odd)
    shutil.copy(root / "base" / "tiny.yaml", odd[:-12] + ".yaml")
    return tried(root, "convert", odd, str(root / "out"))


def convert_onto_itself(root):
    src = root / "base" / "tiny.safetensors"
    return tried(root, "convert", str(src), str(src), "--overwrite")


def convert_into_source(root):
    cli("convert", str(root / "base" / "tiny.safetensors"), str(root / "folder"))
    return tried(root, "convert", str(root / "folder"), str(root / "folder" / "unet" / "x.safetensors"), "--overwrite")


def convert_over_unrelated_folder(root):
    return tried(root, "convert", str(root / "base" / "tiny.safetensors"), str(root / "pictures"), "--overwrite")


def convert_folder_over_file(root):
    shutil.copy(root / "base" / "tiny.safetensors", root / "exists.safetensors")
    return tried(root, "convert", str(root / "base" / "tiny.safetensors"), str(root / "exists.safetensors"), "--overwrite")


@contextlib.contextmanager
def disk_full_for(fragment: str):
    """Writes whose path contains `fragment` fail as a full disk does (after half a file)."""
    import errno

    from dreambooth_ext.bridge import tensor_io

    real = tensor_io.write_safetensors_stream

    def full(path, *a, **k):
        if fragment not in str(path):
            return real(path, *a, **k)
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    tensor_io.write_safetensors_stream = full
    try:
        yield
    finally:
        tensor_io.write_safetensors_stream = real


def disk_full_final_model(root):
    cli(*train_args(root))  # run_2.safetensors exists, written by this run
    with disk_full_for("Stable-diffusion"):
        return tried(root, *train_args(root))  # the same run again must rewrite it


def disk_full_mid_run(root):
    with disk_full_for("Stable-diffusion"):
        return tried(root, *train_args(root, "--steps", "4", "--save-model-every", "2"))


CASES: List[Case] = [
    Case("run named after its own base (mybase / mybase_2)", own_base_clash),
    Case("someone else's NAME_<step>.safetensors exists", foreign_file_clash),
    Case("a second run of the same name (live lock)", second_run_same_name),
    Case("a lock left by a killed run", stale_lock),
    Case("class folder = instance folder", class_is_instance),
    Case("a 240-character name", long_name),
    Case("resolution 72 (model needs 16s)", bad_resolution),
    Case("checkpoint path that does not exist", missing_checkpoint),
    Case("empty instance folder", empty_instance_folder),
    Case("corrupt progress.json", corrupt_progress),
    Case("resume with a changed learning rate", resume_changed),
    Case("kill between the state renames", killed_between_renames),
    Case("stale .partial- temporary of a killed run", stale_temporaries),
    Case("settings file nested 100,000 deep", nested_settings),
    Case("settings file with a 5,000-digit integer", huge_integer),
    Case("a folder given as the settings file", folder_as_settings),
    Case("malicious pickle .ckpt", malicious_pickle),
    Case("base with a NaN weight", nan_base),
    Case("learning rate 10", learning_rate_10),
    Case("checkpoint name not UTF-8", non_utf8_name),
    Case("disk full while rewriting the final model", disk_full_final_model),
    Case("disk full at a model save during the run", disk_full_mid_run),
    Case("convert SRC onto itself --overwrite", convert_onto_itself),
    Case("convert into the source folder --overwrite", convert_into_source),
    Case("convert --overwrite onto a folder of photos", convert_over_unrelated_folder),
    Case("convert a file to a folder over an existing file", convert_folder_over_file),
]


# ----------------------------------------------------------------------------- running and the table


def snapshot(root: Path) -> Dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _temporary(key: str) -> bool:
    return ".partial-" in key or ".previous-" in key


def effects(before: Dict[str, str], after: Dict[str, str]) -> str:
    """A changed or vanished file the user had is LOST (the run's own workspace and temporaries aside)."""
    lost = [k for k, v in before.items() if after.get(k) != v and "/dreambooth/" not in f"/{k}" and not _temporary(k)]
    new = [k for k in after if k not in before and "/dreambooth/" not in f"/{k}"]
    parts = [f"LOST {', '.join(lost[:3])}"] if lost else ["nothing lost"]
    if new:
        parts.append(f"wrote {', '.join(sorted(new)[:2])}{' ...' if len(new) > 2 else ''}")
    return "; ".join(parts)


def try_case(case: Case) -> Tuple[int, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _tiny(root)
        _images(root)
        return case.run(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    print("| input | exit | what the user sees | files |\n|---|---|---|---|")
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        code, text, files = try_case(case)
        text = text.replace("|", "\\|")
        print(f"| {case.name} | {code} | {text[:400]} | {files} |", flush=True)


if __name__ == "__main__":
    main()
