"""Training recipes: what a method adds to the shared loop (its model, trainable parameters,
data, loss and default hyper-parameters). Everything else lives in `vprkit.train.loop`.

A recipe's `defaults` are the method's official settings; every key can be overridden from
a config file or the command line.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vprkit.data.augment import TrainTransform
from vprkit.errors import VprkitError
from vprkit.models.registry import create_model, model_info
from vprkit.train.distributed import World, gather, gather_with_grad
from vprkit.train.losses import MultiSimilarity, R2FormerLoss, TripletLoss
from vprkit.train.sources import LoaderSource, TripletSource

log = logging.getLogger("vprkit.train")

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
    "scheduler": "none",  # none | step | cosine | warmup_cosine_epochs
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
    "val_rerank_num": 0,  # re-rank the top N in validation with the model's own re-ranker
    "checkpoint_every": 100,  # optimizer steps between checkpoints (and every epoch end)
    "save_dir": "runs",
    "run_name": None,
}


def official_train_only(model_name: str) -> list[str] | None:
    """The trainable-parameter patterns the model declares (its `ModelInfo.train_only`), as
    the list a config holds."""
    patterns = model_info(model_name).train_only
    return None if patterns is None else list(patterns)


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
    if patterns is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        matched = set()
        for name, p in model.named_parameters():
            hits = [pat for pat in patterns if fnmatch.fnmatch(name, pat)]
            p.requires_grad_(bool(hits))
            matched.update(hits)
        unused = [pat for pat in patterns if pat not in matched]
        if unused:
            raise VprkitError(f"train_only patterns match no parameter: {unused}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class Recipe:
    name: str
    description: str
    defaults: dict
    # The weights the official run starts from; a run without init_weights is warned.
    official_init: str | None = None

    def config_defaults(self) -> dict:
        return {**COMMON_DEFAULTS, **self.defaults}

    def check_model_settings(self, cfg: dict) -> None:
        """What `build_model` would refuse, checked before a run folder is made."""
        if not cfg["model"]:
            raise VprkitError(
                f"recipe {self.name!r} needs a model: set model=<registered name> "
                "(`vprkit models` lists them)"
            )

    def read_data(self, cfg: dict, world: World):
        """The training data's index (file lists, no image decoded), checked against the batch
        settings; `build_data` then makes the batch source from it."""
        raise NotImplementedError

    def build_model(self, cfg: dict) -> nn.Module:
        self.check_model_settings(cfg)
        if self.official_init and not cfg["init_weights"]:
            log.warning(
                "recipe %s: starting from random weights; the official run starts from %s "
                "(init_weights=%s)",
                self.name,
                self.official_init,
                self.official_init,
            )
        return create_model(cfg["model"], weights=cfg["init_weights"], **cfg["model_options"])

    def build_data(self, cfg: dict, world: World, model: nn.Module, data=None):
        """(a batch source from `vprkit.train.sources`, a description for the log); `data`
        is what `read_data` returned (read here when not given)."""
        raise NotImplementedError

    def train_module(self, model: nn.Module) -> nn.Module:
        """What `loss` calls (and DDP wraps): the model itself unless a recipe needs more
        than the model's forward in one step."""
        return model

    def make_loss(self, cfg: dict):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, cfg: dict, world: World, loss_fn):
        """(loss tensor, dict of figures to log) for one batch."""
        raise NotImplementedError


class GSVRecipe(Recipe):
    """Places x images batches from a GSV-Cities tree, multi-similarity loss (CricaVPR)."""

    def read_data(self, cfg: dict, world: World):
        from vprkit.data.gsv_cities import read_gsv_cities

        if not cfg.get("gsv_root"):
            raise VprkitError(f"recipe {self.name!r} needs gsv_root=<GSV-Cities folder>")
        data = read_gsv_cities(
            cfg["gsv_root"], cities=cfg["cities"], min_images_per_place=cfg["images_per_place"]
        )
        places, per_batch = len(data), cfg["places_per_batch"]
        if per_batch > places:
            raise VprkitError(
                f"places_per_batch={per_batch} is more than the {places} places of "
                f"{cfg['gsv_root']} with at least images_per_place={cfg['images_per_place']} "
                f"images; set places_per_batch={places} or fewer"
            )
        if per_batch % world.size:
            raise VprkitError(
                f"places_per_batch={per_batch} must divide by the {world.size} processes "
                "(each gets an equal slice of every batch)"
            )
        return data

    def build_data(self, cfg: dict, world: World, model: nn.Module, data=None):
        from vprkit.data.gsv_cities import GSVCitiesDataset, collate_places
        from vprkit.train.samplers import PlaceBatchSampler

        if data is None:
            data = self.read_data(cfg, world)
        transform = TrainTransform(
            image_size=tuple(cfg["image_size"]),
            horizontal_flip_p=cfg["horizontal_flip_p"],
            rand_augment_num_ops=cfg["rand_augment_ops"],
            # torchvision's default 9 unless the recipe sets it (BoQ: 15)
            rand_augment_magnitude=cfg.get("rand_augment_magnitude", 9),
        )
        dataset = GSVCitiesDataset(
            data, cfg["images_per_place"], TorchRngTransform(transform), seed=cfg["seed"]
        )
        across_ranks = cfg["encoder_across_ranks"] and world.distributed
        if across_ranks:  # CricaVPR's encoder over the whole global batch
            model.batch_mode = "gathered"
        sampler = PlaceBatchSampler(
            data.place_cities,
            cfg["places_per_batch"],
            city_grouped=cfg["city_grouped"],
            drop_last=across_ranks,  # gathering needs equal slices on every rank
            seed=cfg["seed"],
            num_replicas=world.size,
            rank=world.rank,
        )
        source = LoaderSource(dataset, sampler, collate_places, cfg["num_workers"], cfg["seed"])
        return source, f"{data!r}; transform {transform!r}"

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


class TripletRecipe(Recipe):
    """VG-benchmark triplets (query, positive within 10 m, hardest negatives beyond 25 m)
    re-mined with the current model, triplet loss on global descriptors, plus SelaVPR's
    mutual-NN local loss when `local_loss_weight` > 0."""

    def read_data(self, cfg: dict, world: World):
        from vprkit.data.triplets import load_triplet_data

        if not cfg.get("train_dataset_folder"):
            raise VprkitError(
                f"recipe {self.name!r} needs train_dataset_folder=<VG dataset or MSLS root>"
            )
        if cfg["mining"] == "precomputed" and not cfg["hard_negatives_file"]:
            raise VprkitError(
                "mining=precomputed needs hard_negatives_file=<a `vprkit mine` file>; or "
                "mining=partial to mine with the model"
            )
        data = load_triplet_data(
            cfg["train_dataset_folder"],
            cfg["train_split"],
            train_positives_dist_threshold=cfg["train_positives_dist_threshold"],
            val_positive_dist_threshold=cfg["positive_dist_threshold"],
            msls_cities=cfg["msls_cities"],
        )
        batch, queries = cfg["train_batch_size"], data.num_queries
        if batch > queries:
            raise VprkitError(
                f"train_batch_size={batch} is more than the {queries} training queries (with a "
                f"positive) of {cfg['train_dataset_folder']}; set train_batch_size={queries} "
                "or fewer"
            )
        if batch > cfg["cache_refresh_rate"]:
            raise VprkitError(
                f"cache_refresh_rate={cfg['cache_refresh_rate']} mines fewer queries than one "
                f"batch of train_batch_size={batch}; set cache_refresh_rate={batch} or more"
            )
        if batch % world.size:
            raise VprkitError(
                f"train_batch_size={batch} must divide by the {world.size} processes (each "
                "gets an equal slice of every batch)"
            )
        return data

    def build_data(self, cfg: dict, world: World, model: nn.Module, data=None):
        from vprkit.data.images import Preprocess
        from vprkit.data.triplets import TripletsDataset, collate_triplets, model_feature_fn

        if data is None:
            data = self.read_data(cfg, world)
        transform = TrainTransform(
            image_size=tuple(cfg["image_size"]),
            horizontal_flip_p=cfg["horizontal_flip_p"],
            rand_augment_num_ops=cfg["rand_augment_ops"],
        )
        dataset = TripletsDataset(
            data,
            cfg["mining"],
            negs_num_per_query=cfg["negs_num_per_query"],
            cache_refresh_rate=cfg["cache_refresh_rate"],
            neg_samples_num=cfg["neg_samples_num"],
            neg_hardness=cfg["neg_hardness"],
            hard_negatives_file=cfg["hard_negatives_file"],
            transform=transform,
            seed=cfg["seed"],
        )
        source = TripletSource(
            dataset,
            cfg["train_batch_size"],
            cfg["queries_per_epoch"],
            world,
            collate_triplets,
            cfg["num_workers"],
            cfg["seed"],
        )
        source.feature_fn = model_feature_fn(
            model,
            Preprocess(image_size=tuple(cfg["image_size"])),
            cfg["infer_batch_size"],
            cfg["device"],
            precision=cfg["precision"],
        )
        text = (
            f"{data.num_queries} training queries ({data.num_dropped_queries} without a "
            f"positive dropped), {cfg['mining']} mining, {source.refreshes} refresh(es) of "
            f"{source.batches_per_refresh} batches per epoch; transform {transform!r}"
        )
        return source, text

    def make_loss(self, cfg: dict) -> TripletLoss:
        return TripletLoss(cfg["margin"], cfg["local_loss_weight"])

    def loss(self, model, batch, cfg, world, loss_fn):
        images, _ = batch
        out = model(images.to(cfg["device"]))
        return loss_fn(out, cfg["negs_num_per_query"])


class R2FormerPairs(nn.Module):
    """R2Former's training step in one forward: descriptors and tokens of a triplet batch,
    then the re-ranker's logits of every (query, positive) and (query, negative) pair, as
    `train_reranker.py` computes them per negative (the positive pair once here: the
    re-ranker scores each pair independently, so the values are the same)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, negs: int, rerank: bool):
        out = self.model(images, local=rerank)
        if not rerank:
            return out.global_desc, None
        tokens = out.local_tokens.view(-1, 2 + negs, *out.local_tokens.shape[1:])
        others = 1 + negs  # positive, then each negative
        q_tokens = tokens[:, :1].expand(-1, others, -1, -1).flatten(0, 1)
        logits = self.model.Reranker.logits(q_tokens, tokens[:, 1:].flatten(0, 1))
        return out.global_desc, logits.view(-1, others, logits.shape[1])


class R2FormerRecipe(TripletRecipe):
    """R2Former's three phases on triplets (VG format or MSLS; the official shell scripts of
    bytedance/R2Former): `triplet_loss` on
    the global descriptors and/or `rerank_loss`, the re-ranker's 2-class cross-entropy."""

    def check_model_settings(self, cfg: dict) -> None:
        super().check_model_settings(cfg)
        if cfg["rerank_loss"] and not cfg["triplet_loss"] and not cfg["init_weights"]:
            raise VprkitError(
                f"recipe {self.name!r} trains the re-ranker on a frozen global model: set "
                "init_weights=<a trained global model> (a `vprkit train r2former` best.pth, "
                "or init_weights=r2former_global_msls, the official msls_v2_deits.pth)"
            )
        if not (cfg["rerank_loss"] or cfg["triplet_loss"]):
            raise VprkitError("set triplet_loss=True, rerank_loss=True or both")

    def train_module(self, model: nn.Module) -> nn.Module:
        return R2FormerPairs(model)

    def make_loss(self, cfg: dict) -> R2FormerLoss:
        return R2FormerLoss(
            cfg["margin"], cfg["triplet_loss"], cfg["rerank_loss"], cfg["train_batch_size"]
        )

    def loss(self, model, batch, cfg, world, loss_fn):
        images, _ = batch
        negs = cfg["negs_num_per_query"]
        global_desc, logits = model(images.to(cfg["device"]), negs, cfg["rerank_loss"])
        return loss_fn(global_desc, logits, negs)


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
    # CricaVPR under torchrun: False = the encoder attends within each rank's slice (as the
    # official DataParallel run did per GPU), True = across the whole global batch.
    "encoder_across_ranks": False,
}

TRIPLET_DEFAULTS = {
    "train_dataset_folder": None,  # a VG-format dataset or a Mapillary SLS root
    "train_split": "train",
    "msls_cities": None,  # MSLS: the train cities to read (default: the official 22)
    "train_positives_dist_threshold": 10.0,
    "mining": "partial",
    "negs_num_per_query": 2,
    "cache_refresh_rate": 1000,
    "neg_samples_num": 1000,
    "neg_hardness": 100,
    "hard_negatives_file": None,
    "queries_per_epoch": 5000,
    "train_batch_size": 4,  # queries per batch, each with a positive and its negatives
    "margin": 0.1,
    "local_loss_weight": 0.0,
    "rand_augment_ops": 0,
    "horizontal_flip_p": 0.0,
}

RECIPES: dict[str, Recipe] = {
    "gsv": GSVRecipe(
        "gsv",
        "any registered model on GSV-Cities with the multi-similarity loss (set model=...)",
        {**GSV_DEFAULTS},
    ),
    "cricavpr": GSVRecipe(
        "cricavpr",
        "CricaVPR (Lu-Feng/CricaVPR train.py): GSV-Cities 72x4 at 224, RandAugment(3), MS "
        "loss, Adam 1e-4 halved every 3 epochs, 10 epochs, adapters + encoder + GeM p "
        "trainable, best by R@5",
        {
            **GSV_DEFAULTS,
            "model": "cricavpr",
            "rand_augment_ops": 3,
            "train_only": official_train_only("cricavpr"),
            "optimizer": "adam",
            "lr": 1e-4,
            "scheduler": "step",
            "step_size_epochs": 3,
            "gamma": 0.5,
            "epochs": 10,
            "save_best": "R@5",
        },
        official_init="dinov2_vitb14",
    ),
    "boq": GSVRecipe(
        "boq",
        "BoQ DINOv2 (amaralibey/Bag-of-Queries train.py, src/model.py): GSV-Cities 128x4 at "
        "224, RandAugment(3, magnitude 15), MS loss, AdamW 1e-4 (weight decay 1e-4) x0.1 at "
        "epochs 10 and 20, 40 epochs, the last 2 blocks + aggregator trainable, fp16 on GPU, "
        "validation at 322, best by R@1 (the official 10-epoch linear warm-up is not in "
        "vprkit's loop; x0.1 every 10 epochs instead of milestones 10, 20)",
        {
            **GSV_DEFAULTS,
            "model": "boq",
            "train_only": official_train_only("boq"),
            "places_per_batch": 128,
            "images_per_place": 4,
            "image_size": [224, 224],
            "val_image_size": list(model_info("boq").image_size),
            "rand_augment_ops": 3,
            "rand_augment_magnitude": 15,
            "optimizer": "adamw",
            "lr": 1e-4,
            "weight_decay": 1e-4,
            # MultiStepLR(milestones=[10, 20], gamma=0.1) is met by a step every 10 epochs
            # over the first 30; the 4th step (epochs 30-39) is 10x lower than the official.
            "scheduler": "step",
            "step_size_epochs": 10,
            "gamma": 0.1,
            "epochs": 40,
            "patience": 40,  # the official run has no early stopping
            "save_best": "R@1",
            "precision": "fp16" if torch.cuda.is_available() else "fp32",  # '16-mixed' on GPU
        },
        official_init="dinov2_vitb14",
    ),
    "triplet": TripletRecipe(
        "triplet",
        "any registered model on VG-format triplets with the triplet loss (set model=...)",
        {**TRIPLET_DEFAULTS},
    ),
    "selavpr": TripletRecipe(
        "selavpr",
        "SelaVPR (Lu-Feng/SelaVPR train.py): partial mining, 4 x (query, positive, 2 "
        "negatives) at 224, triplet loss (margin 0.1) + mutual-NN local loss 1:1, Adam 1e-5, "
        "adapters + GeM p + LocalAdapt trainable, patience 3",
        {
            **TRIPLET_DEFAULTS,
            "model": "selavpr",
            "train_only": official_train_only("selavpr"),
            "local_loss_weight": 1.0,
            "optimizer": "adam",
            "lr": 1e-5,
            "epochs": 50,
            "patience": 3,
            "save_best": "R@5",
            "val_rerank_num": 100,  # checkpoints are selected by re-ranked R@5
        },
        official_init="dinov2_vitl14",
    ),
}


# serizba/salad `main.py` (with `vpr_model.py`, `utils/losses.py` and the GSV-Cities loader).
RECIPES["salad"] = GSVRecipe(
    "salad",
    "DINOv2 SALAD (serizba/salad main.py): GSV-Cities 60x4 at 224, RandAugment(3), MS loss, "
    "AdamW 6e-5 (weight decay 9.5e-9), 4 epochs, the last 4 blocks + final norm + "
    "aggregator trainable, fp16 on GPU, best by R@1 (the official LinearLR 1 -> 0.2 over "
    "4000 steps is not in vprkit's loop: x0.65 per epoch instead)",
    {
        **GSV_DEFAULTS,
        "model": "salad",
        "train_only": official_train_only("salad"),
        "places_per_batch": 60,
        "images_per_place": 4,
        "image_size": [224, 224],  # validation too, as the official loader (val_image_size)
        "rand_augment_ops": 3,
        "optimizer": "adamw",
        "lr": 6e-5,
        "weight_decay": 9.5e-9,
        # Closest to LinearLR(start 1, end 0.2, 4000 iterations) stepped per iteration, about
        # the 4 epochs of GSV-Cities at 60 places: the factor 1, 0.65, 0.42, 0.27 per epoch
        # (mean absolute error 0.07 against the official factor).
        "scheduler": "step",
        "step_size_epochs": 1,
        "gamma": 0.65,
        "epochs": 4,
        "precision": "fp16" if torch.cuda.is_available() else "fp32",  # '16-mixed' on GPU
        "save_best": "R@1",  # the official checkpoints are chosen by pitts30k_val R@1
    },
    official_init="dinov2_vitb14",
)

# R2Former's `train_deit.py` / `train_reranker.py` settings shared by its three phases.
R2FORMER_DEFAULTS = {
    **TRIPLET_DEFAULTS,
    "model": "r2former",
    "image_size": list(model_info("r2former").image_size),  # 480x640
    "margin": 0.1,
    "queries_per_epoch": 50000,
    "cache_refresh_rate": 10000,
    "recall_values": [1, 5, 10, 20, 100],
    "triplet_loss": True,
    "rerank_loss": False,
}

# `train_reranker.py` phases: AdamW (weight decay 0.03 hard-coded there), `--cos --warmup 5`
# set per epoch, checkpoints chosen by re-ranked R@1 (`--save_best 0`) over the top 100.
R2FORMER_RERANK_TRAINING = {
    "optimizer": "adamw",
    "weight_decay": 0.03,
    "scheduler": "warmup_cosine_epochs",
    "warmup_epochs": 5,
    "val_rerank_num": 100,
    "save_best": "R@1",
    "rerank_loss": True,
}

RECIPES["r2former"] = R2FormerRecipe(
    "r2former",
    "R2Former phase 1, global retrieval (bytedance/R2Former train_global_retrieval.sh): "
    "DeiT-S at 480x640, 16 x (query, positive, 2 negatives), partial mining, triplet margin "
    "0.1, Adam 1e-5, 50,000 queries per epoch, patience 10 on R@5",
    {
        **R2FORMER_DEFAULTS,
        "train_only": ["backbone.*"],  # train_deit.py's model has no re-ranker
        "optimizer": "adam",
        "lr": 1e-5,
        "train_batch_size": 16,
        "negs_num_per_query": 2,
        "epochs": 100,
        "patience": 10,
        "save_best": "R@5",
    },
    official_init="deit_small_distilled_patch16_224",
)
RECIPES["r2former_rerank"] = R2FormerRecipe(
    "r2former_rerank",
    "R2Former phase 2, the re-ranker on the frozen global model (train_reranking.sh line 1): "
    "negatives drawn from the top 100 of a `vprkit mine` file (set hard_negatives_file and "
    "init_weights), 64 x (query, positive, 1 negative), cross-entropy, only local_head and "
    "Reranker train, AdamW 5e-4, per-epoch cosine with 5 warm-up epochs, 50 epochs",
    {
        **R2FORMER_DEFAULTS,
        **R2FORMER_RERANK_TRAINING,
        "train_only": official_train_only("r2former"),  # train_reranker.py --fix 1
        "triplet_loss": False,
        "mining": "precomputed",
        "neg_hardness": 100,
        "lr": 5e-4,
        "train_batch_size": 64,
        "negs_num_per_query": 1,
        "epochs": 50,
        "patience": 25,
    },
)
RECIPES["r2former_joint"] = R2FormerRecipe(
    "r2former_joint",
    "R2Former phase 3, joint fine-tuning (train_reranking.sh line 2): triplet + "
    "cross-entropy, everything trains, 48 x (query, positive, 2 negatives), partial mining, "
    "AdamW 1e-5, per-epoch cosine with 5 warm-up epochs, 20 epochs (set init_weights to "
    "phase 2's best.pth; model_options={'finetune': True} for the official --finetune 1)",
    {
        **R2FORMER_DEFAULTS,
        **R2FORMER_RERANK_TRAINING,
        "lr": 1e-5,
        "train_batch_size": 48,
        "negs_num_per_query": 2,
        "epochs": 20,
        "patience": 50,
    },
)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise VprkitError(f"unknown training method {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]
