"""vprkit.hub: the weights table, the resumable downloader (against a server on 127.0.0.1),
fetch/resolve, verify and the `vprkit weights` command."""

from __future__ import annotations

import hashlib
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vprkit import hub
from vprkit.cli import main
from vprkit.errors import VprkitError

PAYLOAD = random.Random(0).randbytes(3 * 2**20 + 12345)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
CUT = 1_234_567  # bytes the "cut" route sends before dropping the connection


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD. Routes: /full/* honours Range, /ignore-range/* always answers 200,
    /cut/* honours Range but drops the connection after CUT bytes on its first request,
    anything else is a 404."""

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        server = self.server
        rng = self.headers.get("Range")
        server.requests.append((self.path, rng))
        route = self.path.split("/")[1]
        if route not in ("full", "ignore-range", "cut"):
            self.send_error(404)
            return
        data, start = PAYLOAD, 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and route != "ignore-range":
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route == "cut" and not server.cut_done:
            server.cut_done = True
            self.wfile.write(body[:CUT])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    httpd.cut_done = False
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VPRKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _local_entry(server, name: str = "local_test", **kw) -> hub.WeightsEntry:
    defaults = dict(
        name=name, url=f"{server.base}/full/w.pth", filename="w.pth", sha256=PAYLOAD_SHA256
    )
    return hub.WeightsEntry(**{**defaults, **kw})


def test_table_entries():
    t = hub.OFFICIAL_WEIGHTS
    for arch in ("vits14", "vitb14", "vitl14", "vitg14"):
        assert t[f"dinov2_{arch}"].url == (
            f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth"
        )
        assert t[f"dinov2_{arch}_reg4"].url == (
            f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_reg4_pretrain.pth"
        )
    deit = t["deit_small_distilled_patch16_224"]
    assert deit.sha256_prefix == "649709d9" and deit.sha256 is None
    assert t["cricavpr"].url.endswith("/v1.0/CricaVPR.pth")
    manual = {"selavpr_msls", "selavpr_pitts30k", "selavpr_reg4_msls", "r2former"}
    manual.add("r2former_global_msls")
    assert {n for n, e in t.items() if e.url is None} == manual
    assert all(t[n].manual for n in manual)
    assert t["r2former"].filename == "CVPR23_DeitS_Rerank.pth"
    with pytest.raises(AttributeError):
        deit.url = "x"  # frozen


def test_vprkit_home(monkeypatch, tmp_path):
    monkeypatch.delenv("VPRKIT_HOME", raising=False)
    assert hub.vprkit_home() == Path.home() / ".cache" / "vprkit"
    monkeypatch.setenv("VPRKIT_HOME", str(tmp_path))
    assert hub.weights_dir() == tmp_path / "weights"


def test_full_download_with_sha256(server, tmp_path):
    dest = tmp_path / "sub" / "w.pth"
    out = hub.download(f"{server.base}/full/w.pth", dest, sha256=PAYLOAD_SHA256, progress=False)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not dest.with_suffix(".pth.part").exists()
    assert server.requests == [("/full/w.pth", None)]
    assert hub.sha256_file(dest) == PAYLOAD_SHA256


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    hub.download(f"{server.base}/full/bar.pth", tmp_path / "bar.pth", progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "bar.pth" in captured.err and "100%" in captured.err


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    dest = tmp_path / "w.pth"
    with pytest.raises(hub.ChecksumError) as info:
        hub.download(f"{server.base}/full/w.pth", dest, sha256="0" * 64, progress=False)
    msg = str(info.value)
    assert str(dest) in msg and "0" * 64 in msg and PAYLOAD_SHA256 in msg
    assert isinstance(info.value, VprkitError)
    assert not dest.exists() and not dest.with_suffix(".pth.part").exists()


def test_sha256_prefix(server, tmp_path):
    dest = tmp_path / "w.pth"
    url = f"{server.base}/full/w.pth"
    hub.download(url, dest, sha256_prefix=PAYLOAD_SHA256[:8], progress=False)
    assert dest.read_bytes() == PAYLOAD
    bad = "0" * 8 if not PAYLOAD_SHA256.startswith("0" * 8) else "f" * 8
    dest2 = tmp_path / "w2.pth"
    with pytest.raises(hub.ChecksumError, match=f"prefix {bad}"):
        hub.download(url, dest2, sha256_prefix=bad, progress=False)
    assert not dest2.exists() and not dest2.with_suffix(".pth.part").exists()
    with pytest.raises(ValueError, match="hex"):
        hub.download(url, dest2, sha256_prefix="xyz", progress=False)


def test_interrupted_then_resumed(server, tmp_path):
    dest = tmp_path / "w.pth"
    part = dest.with_suffix(".pth.part")
    url = f"{server.base}/cut/w.pth"
    with pytest.raises(hub.DownloadError, match="run the same command again") as info:
        hub.download(url, dest, sha256=PAYLOAD_SHA256, progress=False, chunk_size=1 << 16)
    assert str(part) in str(info.value)
    assert not dest.exists()
    assert part.read_bytes() == PAYLOAD[:CUT]

    out = hub.download(url, dest, sha256=PAYLOAD_SHA256, progress=False)
    assert server.requests == [("/cut/w.pth", None), ("/cut/w.pth", f"bytes={CUT}-")]
    assert out.read_bytes() == PAYLOAD and not part.exists()


def test_resume_when_server_ignores_range(server, tmp_path):
    dest = tmp_path / "w.pth"
    part = dest.with_suffix(".pth.part")
    stale = b"stale bytes that must not survive" * 100
    part.write_bytes(stale)
    hub.download(f"{server.base}/ignore-range/w.pth", dest, sha256=PAYLOAD_SHA256, progress=False)
    assert server.requests == [("/ignore-range/w.pth", f"bytes={len(stale)}-")]
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_complete_part_is_finished_without_refetching(server, tmp_path):
    # A run that stopped between the last byte and the rename: the server answers 416.
    dest = tmp_path / "w.pth"
    dest.with_suffix(".pth.part").write_bytes(PAYLOAD)
    hub.download(f"{server.base}/full/w.pth", dest, sha256=PAYLOAD_SHA256, progress=False)
    assert server.requests == [("/full/w.pth", f"bytes={len(PAYLOAD)}-")]
    assert dest.read_bytes() == PAYLOAD


def test_http_error_is_download_error(server, tmp_path):
    url = f"{server.base}/nothing-here"
    with pytest.raises(hub.DownloadError, match="HTTP 404") as info:
        hub.download(url, tmp_path / "w.pth", progress=False)
    assert isinstance(info.value, OSError) and isinstance(info.value, VprkitError)
    assert not (tmp_path / "w.pth").exists()


def test_fetch_downloads_once(server, home, monkeypatch):
    entry = _local_entry(server)
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, entry.name, entry)
    path = hub.fetch(entry.name, progress=False)
    assert path == home / "weights" / "w.pth" and path.read_bytes() == PAYLOAD
    assert hub.fetch(entry.name, progress=False) == path
    assert len(server.requests) == 1  # the cached, verified file is not downloaded again
    assert hub.resolve_weights(entry.name) == path
    assert len(server.requests) == 1


def test_fetch_replaces_a_corrupt_cached_file(server, home, monkeypatch):
    entry = _local_entry(server, sha256=None, sha256_prefix=PAYLOAD_SHA256[:8])
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, entry.name, entry)
    cached = home / "weights" / "w.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"corrupt")
    assert hub.fetch(entry.name, progress=False).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_fetch_dest_dir(server, home, tmp_path, monkeypatch):
    entry = _local_entry(server)
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, entry.name, entry)
    path = hub.fetch(entry.name, dest_dir=tmp_path / "elsewhere", progress=False)
    assert path == tmp_path / "elsewhere" / "w.pth" and path.read_bytes() == PAYLOAD


def test_manual_entry_says_where_to_put_it(home):
    cache_path = home / "weights" / "SelaVPR_msls.pth"
    with pytest.raises(hub.ManualDownloadRequired) as info:
        hub.fetch("selavpr_msls")
    msg = str(info.value)
    assert str(cache_path) in msg and "Google Drive" in msg and "path" in msg
    # Once the user saved it there, the name resolves to it.
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(b"weights")
    assert hub.resolve_weights("selavpr_msls") == cache_path


def test_resolve_weights(tmp_path, home):
    f = tmp_path / "my.pth"
    f.write_bytes(b"x")
    assert hub.resolve_weights(f) == f
    assert hub.resolve_weights(str(f)) == f
    with pytest.raises(ValueError, match="dinov2_vitb14") as info:
        hub.resolve_weights("no_such_weights")
    assert "known names" in str(info.value) and "r2former" in str(info.value)
    with pytest.raises(ValueError, match="directory"):
        hub.resolve_weights(tmp_path)
    with pytest.raises(ValueError, match="known names"):
        hub.resolve_weights(tmp_path / "missing.pth")


def test_verify(tmp_path, home, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(PAYLOAD[:1000])
    good = hashlib.sha256(PAYLOAD[:1000]).hexdigest()
    assert hub.verify(f, sha256=good).status == "ok"
    assert hub.verify(f, sha256=good[:10].upper()).status == "ok"
    r = hub.verify(f, sha256="f" * 64 if good[0] != "f" else "0" * 64)
    assert r.status == "mismatch" and r.actual == good and not r.ok
    unknown = hub.verify(f)
    assert unknown.status == "no known checksum" and unknown.actual == good
    assert not unknown.ok and unknown.exit_status == 3 and good in unknown.message()
    # By table name, and by file name when no name is given.
    entry = hub.WeightsEntry("local_test", None, "w.pth", sha256_prefix=good[:8])
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, entry.name, entry)
    assert hub.verify(f, name="local_test").status == "ok"
    assert hub.verify(f).status == "ok"
    assert hub.verify(f, name="dinov2_vitb14").status == "no known checksum"
    with pytest.raises(ValueError, match="not both"):
        hub.verify(f, name="local_test", sha256=good)
    with pytest.raises(FileNotFoundError):
        hub.verify(tmp_path / "missing.pth")


def test_cli_list(home, capsys):
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "CricaVPR.pth").write_bytes(b"\0" * 2048)
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in hub.OFFICIAL_WEIGHTS:
        assert name in lines
    assert "2.0 KiB" in lines["cricavpr"] and " yes " in lines["cricavpr"]
    assert "not known" in lines["cricavpr"]
    assert "manual" in lines["selavpr_msls"] and " no " in lines["selavpr_msls"]
    assert "prefix 649709d9" in lines["deit_small_distilled_patch16_224"]
    assert str(home / "weights") in out


def test_cli_verify_exit_codes(tmp_path, home, capsys):
    # 0 verified, 1 mismatch or error, 3 no known checksum: `verify && use` accepts only 0.
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    assert main(["weights", "verify", str(f), "--sha256", good]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    assert main(["weights", "verify", str(f), "--sha256", "0" * 64]) == 1
    captured = capsys.readouterr()
    assert "mismatch" in captured.err and good in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert main(["weights", "verify", str(f)]) == 3
    captured = capsys.readouterr()
    assert "no known checksum" in captured.err and good in captured.err
    assert "vprkit weights pin" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert main(["weights", "verify", str(tmp_path / "missing.pth")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert "3 no known checksum" in _help(["weights", "verify", "--help"], capsys)


def test_pinned_checksums_are_honoured(server, tmp_path, home, monkeypatch, capsys):
    f = tmp_path / "mine.pth"
    f.write_bytes(b"trusted")
    trusted = hashlib.sha256(b"trusted").hexdigest()
    assert main(["weights", "pin", str(f)]) == 0
    assert trusted in capsys.readouterr().out
    assert (home / "pinned_sha256.txt").read_text() == f"{trusted}  mine.pth\n"
    assert main(["weights", "verify", str(f)]) == 0
    assert "pin of 'mine.pth'" in capsys.readouterr().out
    f.write_bytes(b"tampered")
    assert main(["weights", "verify", str(f)]) == 1
    assert trusted in capsys.readouterr().err
    # Under another name; pinning again replaces the line.
    assert hub.pin(f, "my_model") == ("my_model", hashlib.sha256(b"tampered").hexdigest())
    assert hub.verify(f, name="my_model").ok and not hub.verify(f).ok
    f.write_bytes(b"trusted")
    hub.pin(f, "my_model")
    assert hub.pinned_checksums() == {"mine.pth": trusted, "my_model": trusted}
    with pytest.raises(ValueError, match="neither official .* nor pinned"):
        hub.verify(f, name="not_pinned")

    # An official entry without a checksum: its pin is checked by download and fetch.
    entry = _local_entry(server, sha256=None)
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, entry.name, entry)
    other = tmp_path / "w.pth"
    other.write_bytes(b"not the payload")
    assert hub.pin(other)[0] == entry.name  # named after the official entry with its file name
    with pytest.raises(hub.ChecksumError):
        hub.fetch(entry.name, progress=False)
    assert not (home / "weights" / "w.pth").exists()
    (home / "pinned_sha256.txt").write_text(f"{PAYLOAD_SHA256}  {entry.name}\n")
    assert hub.fetch(entry.name, progress=False).read_bytes() == PAYLOAD
    assert hub.verify(home / "weights" / "w.pth").ok
    assert main(["weights", "list"]) == 0
    assert "pinned checksums:" in capsys.readouterr().out

    # A pin contradicting an official checksum is refused; a malformed pins file names its line.
    official = _local_entry(server, name="official", filename="o.pth")
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, official.name, official)
    with pytest.raises(hub.ChecksumError):
        hub.pin(other, "official")
    (home / "pinned_sha256.txt").write_text(f"{PAYLOAD_SHA256}  ok\nnot a pin\n")
    with pytest.raises(ValueError, match="pinned_sha256.txt, line 2"):
        hub.verify(f)


def test_cli_list_shows_the_cache_under_home_as_tilde(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("VPRKIT_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["weights", "list"]) == 0
    assert "cache: ~/.cache/vprkit/weights\n" in capsys.readouterr().out


def test_cli_download(server, home, monkeypatch, capsys):
    entry = _local_entry(server)
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, entry.name, entry)
    assert main(["weights", "download", entry.name, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "weights" / "w.pth")
    assert main(["weights", "download", "selavpr_msls"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "SelaVPR_msls.pth" in err
    bad = _local_entry(server, name="bad", filename="bad.pth", sha256="0" * 64)
    monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, bad.name, bad)
    assert main(["weights", "download", bad.name, "--no-progress"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (home / "weights" / "bad.pth").exists()


def _help(argv: list[str], capsys) -> str:
    """What `vprkit ARGV --help` prints (argparse exits; main may turn that into a return)."""
    try:
        main(argv)
    except SystemExit:
        pass
    return capsys.readouterr().out


def test_cli_help_shows_defaults(capsys):
    assert "default" in _help(["weights", "download", "--help"], capsys)
