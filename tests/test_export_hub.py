"""hubconf.py: `torch.hub.load(<clone>, name, source="local")` gives what `create_model`
gives; `pretrained=True` fetches the method's official file (served here from 127.0.0.1)."""

from __future__ import annotations

import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import vprkit
from vprkit import hub

REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 64, "num_heads": 4, "depth": 1}


def hub_load(name: str, **kwargs):
    return torch.hub.load(str(REPO), name, source="local", trust_repo=True, **kwargs)


def test_every_registered_model_is_an_entry_point():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vprkit_hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = {n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")}
    # Names with a leading underscore are registered by other test modules, not by vprkit.
    assert {n for n in vprkit.list_models() if not n.startswith("_")} <= names
    assert "official weights (cricavpr)" in module.cricavpr.__doc__


def test_load_from_a_clone_is_create_model():
    torch.manual_seed(0)
    model = hub_load("cricavpr", pretrained=False, **TINY)
    torch.manual_seed(0)
    reference = vprkit.create_model("cricavpr", **TINY)
    assert type(model) is type(reference) and model.vprkit_name == "cricavpr"
    assert model.vprkit_overrides == TINY
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A tiny CricaVPR checkpoint published as the official `cricavpr` on 127.0.0.1."""
    torch.manual_seed(3)
    source = vprkit.create_model("cricavpr", **TINY)
    folder = tmp_path / "www"
    folder.mkdir()
    path = folder / "CricaVPR.pth"
    torch.save({"model_state_dict": source.state_dict()}, path)
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    official = hub.OFFICIAL_WEIGHTS["cricavpr"]
    entry = hub.WeightsEntry(
        name="cricavpr",
        url=f"http://127.0.0.1:{httpd.server_address[1]}/CricaVPR.pth",
        filename=official.filename,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, "cricavpr", entry)
    monkeypatch.setenv("VPRKIT_HOME", str(tmp_path / "home"))
    yield source
    httpd.shutdown()
    httpd.server_close()


def test_pretrained_fetches_the_official_weights(served, tmp_path):
    model = hub_load("cricavpr", pretrained=True, **TINY)
    cached = tmp_path / "home" / "weights" / hub.OFFICIAL_WEIGHTS["cricavpr"].filename
    assert cached.is_file()
    state, expected = model.state_dict(), served.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # The default is pretrained=True, as in the methods' own hub entry points; a file works too.
    again = hub_load("cricavpr", weights=str(cached), **TINY)
    assert torch.equal(
        again.state_dict()["encoder.layers.0.linear1.weight"],
        expected["encoder.layers.0.linear1.weight"],
    )


def test_pretrained_names_the_official_file_of_each_method(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vprkit_hubconf2", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    asked = []

    def resolve(name):
        asked.append(name)
        raise RuntimeError("stop here: no download in this test")

    monkeypatch.setattr(hub, "resolve_weights", resolve)
    for name, official in [
        ("cricavpr", "cricavpr"),
        ("selavpr", "selavpr_msls"),
        ("r2former", "r2former"),
    ]:
        with pytest.raises(RuntimeError, match="stop here"):
            getattr(module, name)(pretrained=True)
        assert asked[-1] == official
    with pytest.raises(RuntimeError, match="stop here"):
        module.selavpr(weights="selavpr_pitts30k")
    assert asked[-1] == "selavpr_pitts30k"
