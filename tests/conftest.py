from pathlib import Path

import pytest

# Real photos and layouts kept beside the project (never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small synthetic city (GSV-Cities training places, VG train/val/test), made once."""
    from vprkit.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth") / "city"
    generate(
        root,
        image_size=(56, 56),
        train_places=48,
        val_queries=24,
        test_queries=16,
        difficulty="easy",
        eval_streets=1,
        vg_train_queries=24,
        vg_train_streets=1,
        num_workers=1,
    )
    return root


@pytest.fixture(scope="session")
def serve_map(tiny_synthetic, tmp_path_factory):
    """A real map of the synthetic city's VG database (EXIF GPS positions), made by
    `build_map` with a tiny random SelaVPR, which keeps local features: it can re-rank."""
    from vprkit.maps import build_map

    m, _ = build_map(
        tiny_synthetic / "vg" / "synthetic" / "images" / "test" / "database",
        tmp_path_factory.mktemp("serve") / "city.map",
        method="selavpr",
        weights="random",
        model_options={"backbone": "dinov2_vits14", "depth": 1},
        image_size=[56, 56],
        num_workers=0,
    )
    return m
