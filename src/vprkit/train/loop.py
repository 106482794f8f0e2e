"""The training loop every method shares (`vprkit train METHOD ...`).

A recipe (`vprkit.train.recipes`) supplies the model, the trainable parameters, the data and
the loss; the loop does the rest: optimizer and schedule, AMP, gradient accumulation and
clipping, DDP under torchrun, validation through the evaluation pipeline, best-checkpoint
selection with patience, and checkpoints that survive a crash (`last.pth` is written to a
temporary file and renamed; `--resume` continues mid-epoch with the same result as an
uninterrupted run on CPU).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError
from vprkit.extract import autocast_context
from vprkit.models.registry import model_info
from vprkit.train.distributed import World, barrier, broadcast_object, cleanup, init_world
from vprkit.train.recipes import RECIPES, Recipe, apply_train_only, get_recipe
from vprkit.train.settings import SettingError, check_combination, check_settings
from vprkit.weights import read_checkpoint, save_checkpoint

log = logging.getLogger("vprkit.train")

# The only settings `--resume` lets differ from the checkpoint's: with them changed, the
# resumed run still equals an uninterrupted run with the new values, because they never
# touch a step's numbers. num_workers: every item's augmentation is seeded by (seed, epoch,
# index), whichever worker loads it. checkpoint_every: when last.pth is written (saving reads
# the RNGs, it draws nothing). max_steps and epochs: where the run stops (not before the
# checkpoint; epochs not when the schedule is built from it, see RESUME_EPOCHS_SCHEDULED).
# save_dir and run_name: ignored on resume, which continues in the checkpoint's folder.
# device: only another device of the same type (cuda:0 -> cuda:1); cpu and cuda differ in
# their kernels and random streams. Every other setting must match, so a resumed run never
# keeps an old value while its checkpoints record a new one.
RESUME_MAY_CHANGE = (
    "num_workers",
    "checkpoint_every",
    "max_steps",
    "epochs",
    "save_dir",
    "run_name",
    "device",
)
# Schedulers whose every learning rate depends on `epochs` (so it may not change on resume).
RESUME_EPOCHS_SCHEDULED = ("cosine", "warmup_cosine_epochs")


class ResumeRefusedError(VprkitError):
    """`--resume` with a checkpoint it cannot continue exactly under the given settings."""


# --------------------------------------------------------------------------- configuration


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class ConfigFileNotFoundError(VprkitError, FileNotFoundError):
    """`--config FILE` names no file."""


def read_config_file(path: Path) -> dict:
    """A TOML or YAML file of settings (flat keys, as `vprkit train METHOD --help` lists).
    A malformed file is refused naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileNotFoundError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise VprkitError(f"{path}: config files are .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise VprkitError(f"{path}: not a text file (not UTF-8: {err.reason})") from None
    data = _read_toml(path, text) if path.suffix == ".toml" else _read_yaml(path, text)
    if not isinstance(data, dict):
        raise VprkitError(
            f"{path}: expected a mapping of settings (KEY: VALUE lines), got a "
            f"{type(data).__name__}"
        )
    return data


def _read_toml(path: Path, text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib puts the place at the end of its message: "... (at line 3, column 5)".
        message = str(err)
        where = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if where:
            message = message[: where.start()].rstrip()
            raise VprkitError(
                f"{path}, line {where[1]}, column {where[2]}: not valid TOML: {message}"
            ) from None
        raise VprkitError(f"{path}: not valid TOML: {message}") from None


def _read_yaml(path: Path, text: str):
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        if mark is not None:  # PyYAML counts lines and columns from 0
            raise VprkitError(
                f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {detail}"
            ) from None
        raise VprkitError(f"{path}: not valid YAML: {detail}") from None
    return {} if data is None else data


def resolve_config(
    recipe: Recipe, file_settings: dict, cli_settings: dict, config_file: Path | None = None
) -> dict:
    """The recipe's defaults, then the config file, then the command line; every value
    checked for its type and range (`vprkit.train.settings`)."""
    cfg = recipe.config_defaults()
    recipes = {name: r.config_defaults() for name, r in RECIPES.items() if name != recipe.name}
    file_where = f"in config file {config_file}" if config_file else "in the config file"
    for where, settings in ((file_where, file_settings), ("on the command line", cli_settings)):
        cfg.update(check_settings(settings, cfg, where, recipe.name, recipes))
    check_combination(cfg)
    return cfg


# --------------------------------------------------------------------------- building blocks


def make_optimizer(cfg: dict, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    name = cfg["optimizer"]
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
        )
    raise VprkitError(f"optimizer must be adam, adamw or sgd, got {name!r}")


def make_scheduler(cfg: dict, optimizer, steps_per_epoch: int):
    """Stepped once per optimizer step (CricaVPR steps its StepLR per iteration)."""
    name = cfg["scheduler"]
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer,
            step_size=max(1, cfg["step_size_epochs"] * steps_per_epoch),
            gamma=cfg["gamma"],
        )
    if name == "cosine":
        total = max(1, cfg["epochs"] * steps_per_epoch)
        warmup = cfg["warmup_epochs"] * steps_per_epoch

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "warmup_cosine_epochs":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: r2former_epoch_factor(
                step // max(1, steps_per_epoch), cfg["warmup_epochs"], cfg["epochs"]
            ),
        )
    raise VprkitError(f"scheduler must be none, step, cosine or warmup_cosine_epochs, got {name!r}")


def r2former_epoch_factor(epoch: int, warmup_epochs: int, epochs: int) -> float:
    """R2Former's `adjust_learning_rate` (`--cos --warmup W`), set once per epoch: from 0.1
    rising linearly over the warm-up epochs, then the cosine of the *whole* run (not of
    the epochs after warm-up), so the first epoch after warm-up is already below 1."""
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        return 0.1 * (1.0 - alpha) + alpha
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Per-step figures to a CSV file (and TensorBoard event files when installed)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.fields: dict[str, list[str]] = {}  # per CSV file: its columns
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tensorboard = None
            log.info("TensorBoard event files off: pip install tensorboard to write them")

    def write(self, step: int, values: dict, csv_name: str = "train_log.csv") -> None:
        """One row of `csv_name` (its columns fixed by its first row, or the file's header
        when a resumed run appends to it)."""
        row = {"step": step, **values}
        path = self.run_dir / csv_name
        if csv_name not in self.fields and path.exists():
            with open(path) as f:
                self.fields[csv_name] = next(csv.reader(f), [])
        new_file = csv_name not in self.fields
        fields = self.fields.setdefault(csv_name, list(row))
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, step)

    def drop_after(self, step: int) -> None:
        """Keep only the rows up to `step` (and no half-written last line) in every CSV."""
        for path in sorted(self.run_dir.glob("*_log.csv")):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            header, kept = rows[0], []
            for row in rows[1:]:
                if len(row) != len(header) or not row[0].isdigit() or int(row[0]) > step:
                    break  # the rest of the file was written after the checkpoint
                kept.append(row)
            if len(kept) == len(rows) - 1:
                continue
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([header, *kept])
            log.info(
                "%s: dropped %d row(s) after step %d", path.name, len(rows) - 1 - len(kept), step
            )

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def load_validation_set(
    folder: str | os.PathLike, split: str, positive_dist_threshold: float = 25.0
):
    """`split` of any layout `vprkit.data.formats` reads; on a Mapillary SLS root, its
    official validation set (cph + sf, the 740 queries the papers report at 25 m)."""
    from vprkit.data.formats import detect_format, open_dataset

    layout = detect_format(folder).name
    options = {"msls_split": "val"} if layout == "msls" else {"split": split}
    return open_dataset(
        folder, format=layout, positive_dist_threshold=positive_dist_threshold, **options
    )


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One training run. `on_step(step)`, when given, is called after every optimizer step,
    once that step's log row and checkpoint (if one is due) are written: a hook for
    callers that watch or stop a run (tests use it to kill the process mid-run)."""

    def __init__(
        self,
        recipe: Recipe,
        cfg: dict,
        run_dir: Path,
        world: World,
        resume: dict | None = None,
        on_step: Callable[[int], None] | None = None,
        data=None,
    ) -> None:
        self.recipe, self.cfg, self.run_dir, self.world = recipe, cfg, run_dir, world
        self.on_step = on_step
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"])
        random.seed(cfg["seed"])
        self.model = recipe.build_model(cfg).to(cfg["device"])
        trainable, total = apply_train_only(self.model, cfg["train_only"])
        log.info(
            "model %s: %s trainable of %s parameters", cfg["model"], f"{trainable:,}", f"{total:,}"
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise VprkitError("no trainable parameters: check train_only")
        self.source, description = recipe.build_data(cfg, world, self.model, data)
        log.info("training data: %s", description)
        self.steps_per_epoch = math.ceil(self.source.num_batches / cfg["grad_accum"])
        self.optimizer = make_optimizer(cfg, params)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.loss_fn = recipe.make_loss(cfg)
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(enabled=cfg["precision"] == "fp16")
        # What the loss calls: the model, or a recipe's wrapper that runs the whole step in
        # one forward (DDP synchronizes only parameters used inside forward).
        self.train_model: nn.Module = recipe.train_module(self.model)
        if world.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.train_model, find_unused_parameters=True
            )
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best, self.not_improved, self.history = None, 0, []
        if resume is not None:
            self._restore(resume)
        self.validation = self._validation_set() if world.is_main else None
        self.metrics = MetricsLog(run_dir) if world.is_main else None
        if self.metrics is not None and resume is not None:
            # Rows a killed run wrote after its last checkpoint are redone now: drop them.
            self.metrics.drop_after(self.step)

    # ---- checkpoints

    def _checkpoint(self, name: str) -> None:
        if not self.world.is_main:
            return
        save_checkpoint(
            self.model,
            self.run_dir / name,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            data=self.source.state_dict(),
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            step=self.step,
            best=self.best,
            not_improved=self.not_improved,
            history=self.history,
            rng=rng_state(),
            config=self.cfg,
            method=self.recipe.name,
        )

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["state_dict"], strict=True)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.source.load_state_dict(checkpoint["data"])
        self.epoch, self.batch_in_epoch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
        self.step, self.best = checkpoint["step"], checkpoint["best"]
        self.not_improved, self.history = checkpoint["not_improved"], checkpoint["history"]
        set_rng_state(checkpoint["rng"])
        log.info(
            "resumed at epoch %d, batch %d (step %d)", self.epoch, self.batch_in_epoch, self.step
        )

    # ---- validation

    def _validation_set(self):
        folder = self.cfg["val_dataset_folder"]
        if not folder:
            return None
        from vprkit.data.images import Preprocess
        from vprkit.pipeline import dataset_positives

        radius = self.cfg["positive_dist_threshold"]
        dataset = load_validation_set(folder, self.cfg["val_split"], radius)
        positives = dataset_positives(dataset, radius)
        if positives is None:
            raise VprkitError(f"validation set {folder} has no labels")
        size = self.cfg["val_image_size"] or self.cfg["image_size"]
        return dataset, positives, Preprocess(image_size=tuple(size))

    def validate(self) -> dict[int, float] | None:
        if self.validation is None:
            return None
        from vprkit.pipeline.evaluate import validation_recalls
        from vprkit.retrieval.metrics import format_recalls

        dataset, positives, preprocess = self.validation
        rerank_num = self.cfg["val_rerank_num"]
        reranker = model_info(self.model).reranker if rerank_num else None
        if rerank_num and reranker is None:
            raise VprkitError(f"val_rerank_num needs a model with a re-ranker: {self.cfg['model']}")
        recalls = validation_recalls(
            self.model,
            dataset,
            positives,
            preprocess,
            self.cfg["recall_values"],
            rerank_num=rerank_num,
            reranker=reranker,
            batch_size=self.cfg["infer_batch_size"],
            num_workers=self.cfg["num_workers"],
            device=self.cfg["device"],
            precision=self.cfg["precision"],
        )
        self.model.train()
        when = "before training" if self.step == 0 else f"epoch {self.epoch}"
        log.info("%s validation: %s", when, format_recalls(recalls))
        return recalls

    # ---- training

    def _stop_requested(self) -> bool:
        return self.cfg["max_steps"] is not None and self.step >= self.cfg["max_steps"]

    def train(self) -> dict:
        cfg, world = self.cfg, self.world
        accum = cfg["grad_accum"]
        if cfg["validate_at_start"] and self.step == 0 and world.is_main:
            recalls = self.validate()
            if recalls is not None:
                self.history.append({"epoch": -1, **{f"R@{n}": v for n, v in recalls.items()}})
        barrier(world)
        self.model.train()
        # The overall estimate: the time per optimizer step so far in this process, times the
        # steps left (an epoch bar alone says nothing about the epochs still to come).
        total_steps = cfg["epochs"] * self.steps_per_epoch
        if cfg["max_steps"] is not None:
            total_steps = min(total_steps, cfg["max_steps"])
        start_time, start_step = time.perf_counter(), self.step
        while self.epoch < cfg["epochs"] and not self._stop_requested():
            self.source.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            bar = tqdm(
                total=self.source.num_batches,
                initial=self.batch_in_epoch,
                desc=f"epoch {self.epoch + 1} of {cfg['epochs']}",
                unit="batch",
                disable=not world.is_main,
                leave=False,
            )
            tick, images = time.perf_counter(), 0
            for batch in self.source:
                with autocast_context(cfg["device"], cfg["precision"]):
                    loss, figures = self.recipe.loss(
                        self.train_model, batch, cfg, world, self.loss_fn
                    )
                self.scaler.scale(loss / accum).backward()
                images += len(batch[0]) * world.size
                self.batch_in_epoch += 1
                bar.update(1)
                last_of_epoch = self.batch_in_epoch == self.source.num_batches
                if self.batch_in_epoch % accum and not last_of_epoch:
                    continue
                if cfg["clip_grad_norm"]:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad_norm"])
                lr = self.optimizer.param_groups[0]["lr"]
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                loss_value = loss.detach().item()
                values = {
                    "epoch": self.epoch,
                    "loss": loss_value,
                    "lr": lr,
                    "images_per_s": images / max(elapsed, 1e-9),
                    **figures,
                }
                images = 0
                if self.metrics is not None:
                    self.metrics.write(self.step, values)
                per_step = (time.perf_counter() - start_time) / (self.step - start_step)
                left = max(0, total_steps - self.step) * per_step
                bar.set_postfix(loss=f"{loss_value:.4f}", left=_duration(left))
                if self.step % cfg["checkpoint_every"] == 0 and not last_of_epoch:
                    self._checkpoint("last.pth")
                if self.on_step is not None:
                    self.on_step(self.step)
                if self._stop_requested():
                    break
            bar.close()
            if self.batch_in_epoch < self.source.num_batches:
                self._checkpoint("last.pth")  # stopped by max_steps mid-epoch
                break
            if self._end_of_epoch():
                break
        barrier(world)
        if self.metrics is not None:
            self.metrics.close()
        return {"step": self.step, "epoch": self.epoch, "best": self.best, "history": self.history}

    def _end_of_epoch(self) -> bool:
        """Validate, keep the best, checkpoint; True when early stopping ends training."""
        recalls = self.validate() if self.world.is_main else None
        self.epoch += 1
        self.batch_in_epoch = 0
        stop = False
        if self.world.is_main and recalls is not None:
            self.history.append(
                {"epoch": self.epoch - 1, **{f"R@{n}": v for n, v in recalls.items()}}
            )
            if self.metrics is not None:
                self.metrics.write(
                    self.step,
                    {"epoch": self.epoch - 1, **{f"val/R@{n}": v for n, v in recalls.items()}},
                    csv_name="val_log.csv",
                )
            key = int(self.cfg["save_best"][2:])
            if key not in recalls:
                raise VprkitError(f"save_best {self.cfg['save_best']} is not among recall_values")
            if self.best is None or recalls[key] > self.best:
                self.best, self.not_improved = recalls[key], 0
                self._checkpoint("best.pth")
            else:
                self.not_improved += 1
                stop = self.not_improved >= self.cfg["patience"]
                if stop:
                    log.info(
                        "no improvement of %s for %d epochs: stopping",
                        self.cfg["save_best"],
                        self.not_improved,
                    )
        self._checkpoint("last.pth")
        return bool(broadcast_object(self.world, stop))


def _duration(seconds: float) -> str:
    """`1h05m`, `4m10s` or `12s`: the overall time left on the progress bar."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --------------------------------------------------------------------------- command line

# Flags with their own spelling; any other setting goes through --set KEY=VALUE.
FLAGS = {
    "gsv_root": Path,
    "train_dataset_folder": Path,
    "val_dataset_folder": Path,
    "model": str,
    "init_weights": str,
    "epochs": int,
    "max_steps": int,
    "lr": float,
    "places_per_batch": int,
    "images_per_place": int,
    "num_workers": int,
    "device": str,
    "precision": str,
    "seed": int,
    "save_dir": Path,
    "run_name": str,
    "checkpoint_every": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=sorted(RECIPES), help="training recipe")
    parser.add_argument("--config", type=Path, help="TOML or YAML file of settings")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting, e.g. --set lr=1e-5",
    )
    parser.add_argument("--resume", type=Path, help="a last.pth to continue from")
    for name, kind in FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument(
        "--model_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor override, e.g. depth=2",
    )


def _key_value(item: str, flag: str) -> tuple[str, object]:
    key, equals, value = item.partition("=")
    if not equals or not key.strip():
        raise SettingError(f"{flag} expects KEY=VALUE, got {item!r} (e.g. {flag} lr=1e-5)")
    return key.strip(), _parse_value(value)


def _cli_settings(args: argparse.Namespace) -> dict:
    settings = dict(_key_value(item, "--set") for item in args.settings)
    for name in [*FLAGS, "image_size"]:
        value = getattr(args, name)
        if value is not None:
            settings[name] = str(value) if isinstance(value, Path) else value
    if args.model_option:
        settings["model_options"] = dict(
            _key_value(item, "--model_option") for item in args.model_option
        )
    return settings


def _resume_allows(key: str, saved: dict, cfg: dict, checkpoint: dict) -> str | None:
    """Why `key` may not change on this resume, or None when it may."""
    if key not in RESUME_MAY_CHANGE:
        return "it changes the result"
    if key == "device":
        same_type = saved[key].partition(":")[0] == cfg[key].partition(":")[0]
        return None if same_type else "cpu, cuda and mps differ in kernels and random streams"
    if key == "epochs":
        if cfg["scheduler"] in RESUME_EPOCHS_SCHEDULED:
            return f"scheduler={cfg['scheduler']} sets every learning rate from it"
        if cfg[key] < checkpoint["epoch"]:
            return f"the checkpoint has already finished {checkpoint['epoch']} epochs"
    if key == "max_steps" and cfg[key] is not None and cfg[key] < checkpoint["step"]:
        return f"the checkpoint is already at step {checkpoint['step']}"
    return None


def _check_resume(checkpoint: dict, cfg: dict, method: str, path: Path) -> None:
    """Refuse a resume that could not continue exactly: another method, or a changed
    setting other than `RESUME_MAY_CHANGE`'s (each listed, old there and new now)."""
    if checkpoint.get("method") != method:
        raise ResumeRefusedError(
            f"cannot resume {path}: it is a {checkpoint.get('method')!r} run, not {method!r}"
        )
    saved = checkpoint["config"]
    refused = []
    for key in sorted(set(saved) | set(cfg)):
        old, new = saved.get(key, "(not recorded)"), cfg.get(key, "(not a setting now)")
        if old == new:
            continue
        why = _resume_allows(key, saved, cfg, checkpoint)
        if why is not None:
            refused.append(f"{key}: {old!r} there, {new!r} now ({why})")
        else:
            log.info("resume: %s changed from %r to %r (allowed)", key, old, new)
    if refused:
        raise ResumeRefusedError(
            f"cannot resume {path} with other settings than it was trained with: "
            + "; ".join(refused)
            + f". Use the checkpoint's values or start a new run; only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change on resume"
        )


def _setup_logging(run_dir: Path | None, world: World) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if world.is_main else logging.WARNING)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(stream)
    if run_dir is not None and world.is_main:
        handler = logging.FileHandler(run_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)


def _new_run_dir(parent: Path) -> Path:
    """`parent/<timestamp>`, with a suffix when two runs start in the same second."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for suffix in ["", *(f"_{i}" for i in range(1, 100))]:
        candidate = parent / (stamp + suffix)
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new run folder in {parent}")


def train(
    method: str,
    settings: dict,
    config_file: Path | None = None,
    resume: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Path, dict]:
    """Train `method`; returns the run folder and a summary. The programmatic entry point;
    `on_step(step)` is called after every optimizer step (see `Trainer`)."""
    recipe = get_recipe(method)
    file_settings = read_config_file(config_file) if config_file else {}
    cfg = resolve_config(recipe, file_settings, settings, config_file)
    checkpoint = None
    if resume is not None:
        resume = Path(resume)
        checkpoint = read_checkpoint(resume)
        _check_resume(checkpoint, cfg, method, resume)
    world = init_world(cfg["device"])
    try:
        # Everything a user can get wrong is checked before the run folder is made.
        recipe.check_model_settings(cfg)
        if cfg["val_rerank_num"] and model_info(cfg["model"]).reranker is None:
            raise SettingError(
                f"val_rerank_num={cfg['val_rerank_num']} needs a model with a re-ranker, and "
                f"{cfg['model']!r} has none; set val_rerank_num=0"
            )
        data = recipe.read_data(cfg, world)
        if resume is not None:
            run_dir = resume.parent
        else:
            run_dir = None
            if world.is_main:
                run_dir = _new_run_dir(
                    Path(cfg["save_dir"]) / (cfg["run_name"] or f"train_{method}")
                )
                (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            run_dir = Path(broadcast_object(world, str(run_dir)))
        _setup_logging(run_dir, world)
        log.info(
            "vprkit train %s: run folder %s (%d process%s)",
            method,
            run_dir,
            world.size,
            "es" if world.size > 1 else "",
        )
        trainer = Trainer(
            recipe, cfg, run_dir, world, resume=checkpoint, on_step=on_step, data=data
        )
        summary = trainer.train()
        if world.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            log.info(
                "done: %d steps; best %s: %s; checkpoints in %s",
                summary["step"],
                cfg["save_best"],
                summary["best"],
                run_dir,
            )
        return run_dir, summary
    finally:
        cleanup(world)


def run(args: argparse.Namespace) -> int:
    train(args.method, _cli_settings(args), args.config, args.resume)
    return 0
