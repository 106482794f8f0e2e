from pathlib import Path

import pytest

# Real photos and layouts kept beside the project (never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA
