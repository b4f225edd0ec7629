"""TrainConfig <-> command-line options: one flag per setting, a JSON file first, flags over it."""

import argparse
import dataclasses
import typing
from dataclasses import fields
from typing import Any, Dict, Optional

from dreambooth_ext.train.config import Concept, GROUPS, TrainConfig, default_of, type_hints
from dreambooth_ext.train.config_io import from_dict, load_config, to_dict

_ALIASES = {"max_steps": ["--steps"]}
_CONCEPT_FLAGS = ("instance_dir", "instance_prompt", "class_prompt", "class_dir", "num_class_images",
                  "caption_mode", "instance_token")


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(group, f: dataclasses.Field, tp: Any, dest: Optional[str] = None) -> None:
    meta = f.metadata
    shown = default_of(f)
    help_text = (meta["help"] + f" (default: {shown!r})" if shown not in ("", []) else meta["help"]).replace("%", "%%")
    kwargs: Dict[str, Any] = {"dest": dest or f.name, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        kwargs.update(nargs="*", type=item, metavar=_METAVARS[item])
    elif meta["choices"]:
        kwargs.update(type=tp, choices=meta["choices"])
    else:
        kwargs.update(type=tp, metavar=_METAVARS[tp])
    flags = [_flag(f.name)] + _ALIASES.get(f.name, [])
    if dest:
        flags = [_flag(dest.replace("concept_", "", 1))]
    group.add_argument(*flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per setting (--max-steps, --no-hflip, ...), grouped as in the tab, plus the single-concept flags."""
    parser.add_argument("--config", default=None, help="JSON config file to start from; flags given here override it.")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    hints = type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name != "concepts":
            _add_option(groups[f.metadata["group"]], f, hints[f.name])
    groups["training"].add_argument("--lora", dest="train_mode", action="store_const", const="lora",
                                    default=argparse.SUPPRESS, help="Same as --train-mode lora.")
    concept_hints, concept_fields = type_hints(Concept), {f.name: f for f in fields(Concept)}
    for name in _CONCEPT_FLAGS:
        _add_option(groups["concepts"], concept_fields[name], concept_hints[name], dest=f"concept_{name}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config first, then each flag given on the command line; single-concept flags set the first concept."""
    data = to_dict(load_config(args.config) if getattr(args, "config", None) else TrainConfig())
    data.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    given = {n: getattr(args, f"concept_{n}") for n in _CONCEPT_FLAGS if hasattr(args, f"concept_{n}")}
    if given:
        if not data["concepts"]:
            data["concepts"] = [dataclasses.asdict(Concept())]
        data["concepts"][0].update(given)
    return from_dict(TrainConfig, data, "the command line")
