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
