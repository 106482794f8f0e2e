"""Every training setting's type and range, checked before a run folder is made.

`vprkit train` takes settings from a recipe's defaults, a config file and the command line;
each value is checked here against the table `SETTINGS` (one entry per key any recipe has),
so `lr=fast` or `checkpoint_every=0` is refused at once, naming the setting, the values it
accepts and a valid example, instead of failing (or silently misbehaving) an hour in.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from vprkit.errors import VprkitError


class SettingError(VprkitError):
    """A training setting of the wrong type or out of range, or an unknown one."""


class _Invalid(Exception):
    """Raised by a checker: the value is not one it accepts (the message says why)."""


# A checker turns an accepted value into its normal form (e.g. a tuple into a list, an int
# into a float for a float setting) or raises _Invalid; `expected` describes what it takes.
Checker = Callable[[object], object]


class Kind:
    def __init__(self, expected: str, check: Checker) -> None:
        self.expected, self.check = expected, check


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(minimum: int, maximum: int | None = None) -> Kind:
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def check(value):
        if isinstance(value, float) and value.is_integer():
            raise _Invalid(f"write it without the decimal point: {int(value)}")
        if not _is_int(value):
            raise _Invalid("")
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid("")
        return value

    return Kind(f"an integer {bounds}", check)


def number(minimum: float | None = None, strict: bool = False, maximum: float | None = None):
    if minimum is None:
        bounds = ""
    elif maximum is not None:
        bounds = f" in [{minimum:g}, {maximum:g}]"
    else:
        bounds = f" {'>' if strict else '>='} {minimum:g}"

    def check(value):
        if isinstance(value, str):
            # YAML 1.1 reads `lr: 1e-5` (no decimal point) as a string: take it as the number.
            try:
                value = float(value)
            except ValueError:
                raise _Invalid("") from None
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise _Invalid("")
        if minimum is not None and (value < minimum or (strict and value == minimum)):
            raise _Invalid("")
        if maximum is not None and value > maximum:
            raise _Invalid("")
        return float(value)  # 1 and 1.0 are the same learning rate: keep one spelling

    return Kind(f"a number{bounds}", check)


def _boolean(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _Invalid("")


BOOLEAN = Kind("true or false", _boolean)


def choice(*options: str) -> Kind:
    def check(value):
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            raise _Invalid(f"did you mean {close[0]}?" if close else "")
        return value

    return Kind(f"one of {', '.join(options)}", check)


def _text(value):
    if not isinstance(value, str) or not value:
        raise _Invalid("")
    return value


TEXT = Kind("a non-empty string", _text)


def optional(kind: Kind) -> Kind:
    """`kind` or None (TOML has no null: the strings "none" and "null" mean None too)."""

    def check(value):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return kind.check(value)

    return Kind(f"{kind.expected}, or none", check)


def _size(value):
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _Invalid("")
    if not all(_is_int(v) and v > 0 for v in value):
        raise _Invalid("")
    return list(value)


SIZE = Kind("[height, width], two positive integers", _size)


def _positive_ints(value):
    if not isinstance(value, list | tuple) or not value:
        raise _Invalid("")
    if not all(_is_int(v) and v > 0 for v in value):
        raise _Invalid("")
    return list(value)


POSITIVE_INTS = Kind("a non-empty list of positive integers", _positive_ints)


def _names(value):
    if isinstance(value, str):  # one pattern or name, or a comma-separated list of them
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, list | tuple) or not value:
        raise _Invalid("")
    if not all(isinstance(v, str) and v for v in value):
        raise _Invalid("")
    return list(value)


NAMES = Kind("a list of names (or one, or several separated by commas)", _names)


def _names_or_text(value):
    # msls_cities is passed on as given: the MSLS reader takes "london,tokyo" or a list.
    if isinstance(value, str) and value:
        return value
    return _names(value)


NAMES_OR_TEXT = Kind(NAMES.expected, _names_or_text)


def _mapping(value):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Invalid("")
    return value


MAPPING = Kind("a mapping of names to values, e.g. {'depth': 2}", _mapping)


def _folder(value):
    path = Path(_text(value)).expanduser()
    if not path.is_dir():
        raise _Invalid(f"{path} is not an existing folder")
    return value


FOLDER = Kind("an existing folder", _folder)


def _file(value):
    path = Path(_text(value)).expanduser()
    if not path.is_file():
        raise _Invalid(f"{path} is not an existing file")
    return value


FILE = Kind("an existing file", _file)


def _weights(value):
    from vprkit.hub import OFFICIAL_WEIGHTS

    if _text(value) in OFFICIAL_WEIGHTS or Path(value).expanduser().is_file():
        return value
    close = difflib.get_close_matches(value, OFFICIAL_WEIGHTS, n=1)
    raise _Invalid(
        f"{value} is neither an existing file nor an official name"
        + (f"; did you mean {close[0]}?" if close else " (`vprkit weights list` shows them)")
    )


WEIGHTS = Kind("a weights file or an official name (`vprkit weights list`)", _weights)


def _model(value):
    from vprkit.models.registry import list_models

    known = list_models()
    if value not in known:
        close = difflib.get_close_matches(str(value), known, n=1)
        raise _Invalid(f"did you mean {close[0]}?" if close else "`vprkit models` lists them")
    return value


MODEL = Kind("a registered model name", _model)


def _device(value):
    text = _text(value)
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return text
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise _Invalid("CUDA is not available here (no GPU, or a CPU-only torch); use cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise _Invalid(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        return text
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise _Invalid("MPS is not available here; use cpu")
        return text
    raise _Invalid("")


DEVICE = Kind("cpu, cuda, cuda:N or mps", _device)


def _recall_key(value):
    text = _text(value)
    if not (text.startswith("R@") and text[2:].isdigit() and int(text[2:]) > 0):
        raise _Invalid("")
    return text


RECALL_KEY = Kind("R@N, with N among recall_values", _recall_key)


# One entry per setting of any recipe (`tests/test_train_settings.py` checks they agree).
SETTINGS: dict[str, Kind] = {
    # model and what trains
    "model": optional(MODEL),
    "model_options": MAPPING,
    "init_weights": optional(WEIGHTS),
    "train_only": optional(NAMES),
    # optimization
    "optimizer": choice("adam", "adamw", "sgd"),
    "lr": number(0, strict=True),
    "weight_decay": number(0),
    "momentum": number(0),
    "scheduler": choice("none", "step", "cosine", "warmup_cosine_epochs"),
    "step_size_epochs": integer(1),
    "gamma": number(0, strict=True),
    "warmup_epochs": integer(0),
    "epochs": integer(1),
    "max_steps": optional(integer(1)),
    "grad_accum": integer(1),
    "clip_grad_norm": optional(number(0)),
    "precision": choice("fp32", "bf16", "fp16"),
    "seed": integer(0, 2**32 - 1),  # NumPy's legacy seed range
    "device": DEVICE,
    "num_workers": integer(0),
    "image_size": SIZE,
    # validation and checkpoints
    "val_dataset_folder": optional(FOLDER),
    "val_split": TEXT,
    "val_image_size": optional(SIZE),
    "infer_batch_size": integer(1),
    "recall_values": POSITIVE_INTS,
    "positive_dist_threshold": number(0, strict=True),
    "save_best": RECALL_KEY,
    "patience": integer(1),
    "validate_at_start": BOOLEAN,
    "val_rerank_num": integer(0),
    "checkpoint_every": integer(1),
    "save_dir": TEXT,
    "run_name": optional(TEXT),
    # GSV-Cities recipes
    "gsv_root": optional(FOLDER),
    "cities": optional(NAMES),
    "places_per_batch": integer(1),
    "images_per_place": integer(1),
    "city_grouped": BOOLEAN,
    "rand_augment_ops": integer(0),
    "rand_augment_magnitude": integer(0, maximum=30),  # of 31 bins, as torchvision
    "horizontal_flip_p": number(0, maximum=1),
    "ms_alpha": number(0, strict=True),
    "ms_beta": number(0, strict=True),
    "ms_base": number(),
    "ms_epsilon": number(0),
    "encoder_across_ranks": BOOLEAN,
    # triplet recipes
    "train_dataset_folder": optional(FOLDER),
    "train_split": TEXT,
    "msls_cities": optional(NAMES_OR_TEXT),
    "train_positives_dist_threshold": number(0, strict=True),
    "mining": choice("partial", "full", "random", "precomputed"),
    "negs_num_per_query": integer(1),
    "cache_refresh_rate": integer(1),
    "neg_samples_num": integer(1),
    "neg_hardness": integer(1),
    "hard_negatives_file": optional(FILE),
    "queries_per_epoch": integer(1),
    "train_batch_size": integer(1),
    "margin": number(0),
    "local_loss_weight": number(0),
    "triplet_loss": BOOLEAN,
    "rerank_loss": BOOLEAN,
}


def _example(key: str, kind: Kind, default: object) -> str:
    """`KEY=default` when the default is a valid value of its own setting."""
    try:
        kind.check(default)
    except _Invalid:
        return ""
    if default is None:
        return ""
    return f", e.g. {key}={_shown(default)} (the default)"


def _shown(value: object) -> str:
    """A value as one would type it after --set (strings without quotes)."""
    return value if isinstance(value, str) and value.strip() == value and value else repr(value)


def check_settings(
    settings: dict, defaults: dict, where: str, recipe: str, recipes: dict[str, dict]
) -> dict:
    """`settings` (from `where`, e.g. "on the command line") checked against the recipe's
    `defaults`, in their normal form. Unknown keys are refused with the closest known key;
    `recipes` (name -> defaults) says which other recipes have a key this one lacks."""
    checked = {}
    for key, value in settings.items():
        if key not in defaults:
            raise SettingError(_unknown(key, where, recipe, defaults, recipes))
        kind = SETTINGS[key]
        try:
            checked[key] = kind.check(value)
        except _Invalid as why:
            reason = f" ({why})" if str(why) else ""
            raise SettingError(
                f"setting {key}={_shown(value)} {where}: {key} must be {kind.expected}{reason}"
                f"{_example(key, kind, defaults[key])}"
            ) from None
    return checked


def _unknown(key: str, where: str, recipe: str, defaults: dict, recipes: dict) -> str:
    message = f"unknown setting {key!r} {where} for recipe {recipe!r}"
    close = difflib.get_close_matches(key, defaults, n=1)
    others = [name for name, d in recipes.items() if key in d]
    if others:
        message += f" (a setting of the {', '.join(others)} recipes)"
    if close:
        return message + f"; did you mean {close[0]}?"
    return message + f"; known: {', '.join(sorted(defaults))}"


def check_combination(cfg: dict) -> None:
    """Checks across settings, once the file and the command line are merged."""
    if cfg["save_best"] and int(cfg["save_best"][2:]) not in cfg["recall_values"]:
        n = int(cfg["save_best"][2:])
        raise SettingError(
            f"save_best={cfg['save_best']} needs {n} among recall_values={cfg['recall_values']}"
            f"; e.g. save_best=R@{cfg['recall_values'][0]}"
        )
