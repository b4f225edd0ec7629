"""Settings to and from JSON: a settings file or a posted dict becomes a TrainConfig with its types
coerced and unknown keys refused (retired ones ignored); a TrainConfig is written back exactly.

The settings themselves are declared in train/config.py; range checks are config_checks.validate.
"""

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Union

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import RETIRED, Concept, TrainConfig, type_hints

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _bad(where: str, wanted: str, value: Any) -> UserError:
    return UserError(f"Setting {where} must be {wanted}, not {json.dumps(value, default=str)}.")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(where, "true or false", value)


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, str):  # "800" or "8e2" from a text box
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _bad(where, "a whole number", value)


def _to_float(value: Any, where: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise _bad(where, "a finite number", value)
    return number


def _to_str(value: Any, where: str) -> str:
    if value is None:  # JSON null for an optional text
        return ""
    if isinstance(value, str):
        return value
    raise _bad(where, "text", value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def coerce(value: Any, tp: Any, where: str) -> Any:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # a lone value is a list of one
        if item is Concept:
            return [from_dict(Concept, v, f"concept {i}{where}") for i, v in enumerate(items, 1)]
        return [coerce(v, item, where) for v in items]
    return _SCALARS[tp](value, where)


def _unknown_key(key: str, cls, where: str) -> UserError:
    names = [f.name for f in fields(cls)]
    other = Concept if cls is TrainConfig else TrainConfig
    if key in {f.name for f in fields(other)}:
        place = "inside each entry of 'concepts'" if other is Concept else "at the top level, not inside a concept"
        return UserError(f"Setting '{key}' in {where} belongs {place}.")
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see --help for the list of settings."
    return UserError(f"Unknown setting '{key}' in {where}; {hint}")


def from_dict(cls, data: Any, where: str):
    if isinstance(data, (TrainConfig, Concept)):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise UserError(f"The settings of {where} must be a JSON object, not {type(data).__name__}.")
    hints, names = type_hints(cls), {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")  # accept CLI spelling in files too
        if cls is TrainConfig and name in RETIRED:
            continue
        if name not in names:
            raise _unknown_key(str(key), cls, where)
        label = f"'{name}' in {where}" if cls is TrainConfig else f"'{name}' of {where}"
        kwargs[name] = coerce(value, hints[name], label if name != "concepts" else f" in {where}")
    return cls(**kwargs)


def to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """Plain JSON-ready dict, fields in declaration order, concepts as a list of objects."""
    return dataclasses.asdict(cfg)


def load_config(source: Union[str, os.PathLike, Dict[str, Any], TrainConfig]) -> TrainConfig:
    """A TrainConfig from a JSON file or a dict; types are coerced, unknown keys refused (retired ones ignored).
    Not range-checked: see validate."""
    if isinstance(source, (dict, TrainConfig)):
        return from_dict(TrainConfig, source, "the config")
    path = Path(source)
    if path.is_dir():
        raise UserError(f"Config file {path} is a folder; give the path of a JSON settings file.")
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"Config file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except UnicodeDecodeError:
        raise UserError(f"Config file {path} is not a UTF-8 text file.") from None
    except RecursionError:
        raise UserError(f"Config file {path} is nested too deeply to be a settings file.") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        what = "a number with too many digits" if "digits" in str(e) else "a value that cannot be read"
        raise UserError(f"Config file {path} holds {what} to be a setting.") from None
    except OSError as e:
        raise UserError(f"Config file {path} cannot be read ({e.strerror or e}).") from None
    return from_dict(TrainConfig, data, str(path))


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike]) -> Path:
    """Write cfg as JSON, atomically (a temporary name, then a rename); load_config reads it back equal."""
    from dreambooth_ext.atomic import write_text

    return write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n", "the settings file")
