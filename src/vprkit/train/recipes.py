"""Training recipes: what a method adds to the shared loop (its model, trainable parameters,
data, loss and default hyper-parameters). Everything else lives in `vprkit.train.loop`.

A recipe's `defaults` are the method's official settings; every key can be overridden from
a config file or the command line.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vprkit.data.augment import TrainTransform
from vprkit.models.registry import create_model
from vprkit.train.distributed import World, gather, gather_with_grad
from vprkit.train.losses import MultiSimilarity

# Settings every recipe has; a recipe's defaults extend or override them.
COMMON_DEFAULTS: dict = {
    "model": None,
    "model_options": {},
    "init_weights": None,  # a weights file or official name to start from
    "train_only": None,  # parameter-name patterns (fnmatch) that train; None = all
    "optimizer": "adam",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "momentum": 0.9,
    "scheduler": "none",  # none | step | cosine
    "step_size_epochs": 3,
    "gamma": 0.5,
    "warmup_epochs": 0,
    "epochs": 10,
    "max_steps": None,  # stop after this many optimizer steps in total
    "grad_accum": 1,
    "clip_grad_norm": None,
    "precision": "fp32",
    "seed": 0,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "num_workers": 2,
    "image_size": [224, 224],
    "val_dataset_folder": None,
    "val_split": "val",
    "val_image_size": None,  # default: image_size
    "infer_batch_size": 16,
    "recall_values": [1, 5, 10, 20],
    "positive_dist_threshold": 25.0,
    "save_best": "R@5",
    "patience": 10,
    "validate_at_start": False,  # also validate the untrained model (history epoch -1)
    "checkpoint_every": 100,  # optimizer steps between checkpoints (and every epoch end)
    "save_dir": "runs",
    "run_name": None,
}


class TorchRngTransform:
    """Adapts a `TrainTransform` (torch.Generator) to datasets that pass a NumPy Generator,
    drawing the torch seed from it so both stay deterministic per item."""

    def __init__(self, transform: TrainTransform) -> None:
        self.transform = transform

    def __call__(self, img, rng: np.random.Generator) -> torch.Tensor:
        seed = int(rng.integers(0, 2**62))
        return self.transform(img, torch.Generator().manual_seed(seed))

    def __repr__(self) -> str:
        return repr(self.transform)


def apply_train_only(model: nn.Module, patterns: list[str] | None) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of `patterns` (fnmatch, e.g.
    `*adapter*`); returns (trainable, total) parameter counts."""
    if patterns is not None:
        matched = set()
        for name, p in model.named_parameters():
            hits = [pat for pat in patterns if fnmatch.fnmatch(name, pat)]
            p.requires_grad_(bool(hits))
            matched.update(hits)
        unused = [pat for pat in patterns if pat not in matched]
        if unused:
            raise ValueError(f"train_only patterns match no parameter: {unused}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class Recipe:
    name: str
    description: str
    defaults: dict

    def config_defaults(self) -> dict:
        return {**COMMON_DEFAULTS, **self.defaults}

    def build_model(self, cfg: dict) -> nn.Module:
        if not cfg["model"]:
            raise ValueError(f"recipe {self.name!r} needs a model: set model=<registered name>")
        return create_model(cfg["model"], weights=cfg["init_weights"], **cfg["model_options"])

    def build_data(self, cfg: dict, world: World):
        """(dataset with set_epoch, batch sampler with set_epoch/num_batches, collate, text)."""
        raise NotImplementedError

    def make_loss(self, cfg: dict):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, cfg: dict, world: World, loss_fn):
        """(loss tensor, dict of figures to log) for one batch."""
        raise NotImplementedError


class GSVRecipe(Recipe):
    """Places x images batches from a GSV-Cities tree, multi-similarity loss (CricaVPR)."""

    def build_data(self, cfg: dict, world: World):
        from vprkit.data.gsv_cities import GSVCitiesDataset, collate_places, read_gsv_cities
        from vprkit.train.samplers import PlaceBatchSampler

        if not cfg.get("gsv_root"):
            raise ValueError(f"recipe {self.name!r} needs gsv_root=<GSV-Cities folder>")
        data = read_gsv_cities(
            cfg["gsv_root"], cities=cfg["cities"], min_images_per_place=cfg["images_per_place"]
        )
        transform = TrainTransform(
            image_size=tuple(cfg["image_size"]),
            horizontal_flip_p=cfg["horizontal_flip_p"],
            rand_augment_num_ops=cfg["rand_augment_ops"],
        )
        dataset = GSVCitiesDataset(
            data, cfg["images_per_place"], TorchRngTransform(transform), seed=cfg["seed"]
        )
        sampler = PlaceBatchSampler(
            data.place_cities,
            cfg["places_per_batch"],
            city_grouped=cfg["city_grouped"],
            seed=cfg["seed"],
            num_replicas=world.size,
            rank=world.rank,
        )
        return dataset, sampler, collate_places, f"{data!r}; transform {transform!r}"

    def make_loss(self, cfg: dict) -> MultiSimilarity:
        return MultiSimilarity(cfg["ms_alpha"], cfg["ms_beta"], cfg["ms_base"], cfg["ms_epsilon"])

    def loss(self, model, batch, cfg, world, loss_fn):
        images, labels = batch
        descriptors = model(images.to(cfg["device"])).global_desc.float()
        # The loss sees the whole global batch, as the official DataParallel runs did (there
        # the model ran per GPU and the outputs were gathered before the loss).
        descriptors = gather_with_grad(world, descriptors)
        labels = gather(world, labels.to(descriptors.device))
        return loss_fn(descriptors, labels)


GSV_DEFAULTS = {
    "gsv_root": None,
    "cities": None,
    "places_per_batch": 72,
    "images_per_place": 4,
    "city_grouped": True,
    "rand_augment_ops": 0,
    "horizontal_flip_p": 0.0,
    "ms_alpha": 1.0,
    "ms_beta": 50.0,
    "ms_base": 0.0,
    "ms_epsilon": 0.1,
}

RECIPES: dict[str, Recipe] = {
    "gsv": GSVRecipe(
        "gsv",
        "any registered model on GSV-Cities with the multi-similarity loss (set model=...)",
        {**GSV_DEFAULTS},
    ),
    "cricavpr": GSVRecipe(
        "cricavpr",
        "CricaVPR (SPEC §1.4): GSV-Cities 72x4 at 224, RandAugment(3), MS loss, Adam 1e-4 "
        "halved every 3 epochs, 10 epochs, adapters + encoder + GeM p trainable, best by R@5",
        {
            **GSV_DEFAULTS,
            "model": "cricavpr",
            "rand_augment_ops": 3,
            "train_only": ["*adapter*", "encoder.*", "aggregation.*"],
            "optimizer": "adam",
            "lr": 1e-4,
            "scheduler": "step",
            "step_size_epochs": 3,
            "gamma": 0.5,
            "epochs": 10,
            "save_best": "R@5",
        },
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]
