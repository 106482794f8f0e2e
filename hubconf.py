"""torch.hub entry points: one per registered model, returning what `vprkit.create_model`
returns (the same `nn.Module`).

    model = torch.hub.load("<owner>/vprkit", "cricavpr", pretrained=True)
    model = torch.hub.load("path/to/clone", "selavpr", source="local", weights="selavpr_pitts30k")
    torch.hub.list("<owner>/vprkit")

`pretrained=True` loads the method's official weights (the first of `vprkit models`; they are
downloaded into ~/.cache/vprkit/weights, or $VPRKIT_HOME/weights, and checked against their
sha256); `weights=` names another official file or a path; `pretrained=False` gives the
random initialization. Other keywords are the model's constructor options
(`depth=2`, `backbone="dinov2_vitb14"`, ...).
"""

import os
import sys

dependencies = ["torch", "numpy", "PIL", "tqdm", "faiss", "sklearn", "h5py"]

# A clone used without `pip install`: its package is in src/.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "vprkit")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from vprkit.models.registry import create_model, list_models, model_info  # noqa: E402


def _official_weights(name):
    official = model_info(name).weights
    if not official:
        raise ValueError(f"{name} has no official weights: use pretrained=False or weights=FILE")
    return official[0]


def _entry_point(name):
    def load(pretrained=True, weights=None, **overrides):
        if weights is None and pretrained:
            weights = _official_weights(name)
        source = None
        if weights is not None:
            from vprkit.hub import resolve_weights

            source = resolve_weights(weights)  # downloads an official file when needed
        return create_model(name, weights=source, **overrides)

    info = model_info(name)
    official = ", ".join(info.weights) or "none"
    load.__name__ = load.__qualname__ = name
    load.__doc__ = (
        f"vprkit's `{name}` (evaluation size {info.image_size[0]}x{info.image_size[1]}); "
        f"pretrained=True loads its official weights ({official}); `weights=` another "
        "official name or a file; other keywords are constructor options."
    )
    return load


for _name in list_models():
    globals()[_name] = _entry_point(_name)
del _name
