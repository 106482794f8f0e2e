"""Official weight files: where they live, a resumable checksummed downloader, and the
`vprkit weights list | download NAME | verify FILE | pin FILE [NAME]` command.

Files are cached in `<VPRKIT_HOME>/weights/<filename>` (VPRKIT_HOME defaults to
`~/.cache/vprkit`). A download goes to `<filename>.part` and is renamed only once its length
and checksum are right, so the final name never holds a half-written file; an interrupted
`.part` is resumed with an HTTP Range request on the next try.

Checksums come from the table below and from the user's pins,
`<VPRKIT_HOME>/pinned_sha256.txt` (`sha256sum` format, written by `vprkit weights pin`), which
`verify`, `fetch` and `download` honour: a file with no known checksum is never "verified".
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError

__all__ = [
    "OFFICIAL_WEIGHTS",
    "ChecksumError",
    "DownloadError",
    "ManualDownloadRequired",
    "VerifyResult",
    "WeightsEntry",
    "add_arguments",
    "download",
    "fetch",
    "pin",
    "pinned_checksums",
    "pins_file",
    "resolve_weights",
    "run",
    "sha256_file",
    "verify",
    "vprkit_home",
    "weights_dir",
]


@dataclass(frozen=True)
class WeightsEntry:
    """One official weight file. `url` is None for files that must be downloaded by hand
    (Google Drive links), in which case `manual` says where to find them."""

    name: str
    url: str | None
    filename: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    description: str = ""
    manual: str | None = None

    @property
    def checksum(self) -> str | None:
        """The full sha256 if known, else the known prefix, else None."""
        return self.sha256 or self.sha256_prefix


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
_DINOV2_ARCHS = {
    "dinov2_vits14": "ViT-S/14, 21M parameters",
    "dinov2_vitb14": "ViT-B/14, 86M parameters; CricaVPR's backbone",
    "dinov2_vitl14": "ViT-L/14, 300M parameters; SelaVPR's backbone",
    "dinov2_vitg14": "ViT-g/14, 1.1B parameters",
}
_SELAVPR_NOTE = (
    "download it from the Google Drive link in the SelaVPR README "
    "(https://github.com/Lu-Feng/SelaVPR)"
)
_R2FORMER_NOTE = (
    "download it from the Google Drive link in the R2Former README "
    "(https://github.com/bytedance/R2Former)"
)


def _build_table() -> dict[str, WeightsEntry]:
    # No sha256 is recorded for files whose hash nobody here has computed from the real
    # file: a guessed hash would reject every correct download.
    entries: list[WeightsEntry] = []
    for arch, desc in _DINOV2_ARCHS.items():
        for reg, extra in (("", ""), ("_reg4", " with 4 register tokens")):
            entries.append(
                WeightsEntry(
                    name=f"{arch}{reg}",
                    url=_DINOV2_URL.format(arch=arch, reg=reg),
                    filename=f"{arch}{reg}_pretrain.pth",
                    description=f"DINOv2 {desc}{extra} (Meta, pretrained)",
                )
            )
    entries += [
        WeightsEntry(
            name="deit_small_distilled_patch16_224",
            url="https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth",
            filename="deit_small_distilled_patch16_224-649709d9.pth",
            # timm's check_hash convention: the hex in the file name starts its sha256.
            sha256_prefix="649709d9",
            description="DeiT-S distilled, ImageNet (Meta); R2Former's backbone",
        ),
        WeightsEntry(
            name="cricavpr",
            url="https://github.com/Lu-Feng/CricaVPR/releases/download/v1.0/CricaVPR.pth",
            filename="CricaVPR.pth",
            description="CricaVPR (CVPR 2024), DINOv2 ViT-B/14, trained on GSV-Cities",
        ),
        WeightsEntry(
            # hubconf.py (gmberton/MegaLoc) downloads `model.safetensors` from the Hugging
            # Face repository gberton/MegaLoc; cached under a name of its own here.
            name="megaloc",
            url="https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors",
            filename="megaloc.safetensors",
            description="MegaLoc (2025), DINOv2 ViT-B/14 + SALAD-style aggregator, 8448-D; "
            "model.safetensors of huggingface.co/gberton/MegaLoc",
        ),
        WeightsEntry(
            # hubconf.py (serizba/salad) loads it from the v1.0.0 release; a plain state dict
            name="salad",
            url="https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt",
            filename="dino_salad.ckpt",
            description="DINOv2 SALAD (CVPR 2024), DINOv2 ViT-B/14, 8448-D, trained on GSV-Cities",
        ),
        WeightsEntry(
            name="selavpr_msls",
            url=None,
            filename="SelaVPR_msls.pth",
            description="SelaVPR (ICLR 2024), DINOv2 ViT-L/14, fine-tuned on MSLS",
            manual=_SELAVPR_NOTE,
        ),
        WeightsEntry(
            name="selavpr_pitts30k",
            url=None,
            filename="SelaVPR_pitts30k.pth",
            description="SelaVPR (ICLR 2024), DINOv2 ViT-L/14, fine-tuned on Pitts30k",
            manual=_SELAVPR_NOTE,
        ),
        WeightsEntry(
            name="selavpr_reg4_msls",
            url=None,
            filename="SelaVPR_reg4_msls.pth",
            description="SelaVPR (ICLR 2024), DINOv2 ViT-L/14 with registers, MSLS "
            "(model option backbone=dinov2_vitl14_reg4)",
            manual=_SELAVPR_NOTE,
        ),
        WeightsEntry(
            name="r2former",
            url=None,
            filename="CVPR23_DeitS_Rerank.pth",
            description="R2Former (CVPR 2023), global model and re-ranker, MSLS",
            manual=_R2FORMER_NOTE,
        ),
        WeightsEntry(
            name="r2former_global_msls",
            url=None,
            filename="msls_v2_deits.pth",
            description="R2Former (CVPR 2023), global retrieval model only, MSLS",
            manual=_R2FORMER_NOTE,
        ),
        WeightsEntry(
            name="boq_dinov2",
            # hubconf.py's MODEL_URLS["dinov2_12288"] (amaralibey/Bag-of-Queries)
            url="https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/dinov2_12288.pth",
            filename="dinov2_12288.pth",
            description="BoQ (CVPR 2024), DINOv2 ViT-B/14, 12288-D, trained on GSV-Cities",
        ),
    ]
    return {e.name: e for e in entries}


OFFICIAL_WEIGHTS: dict[str, WeightsEntry] = _build_table()


class ChecksumError(VprkitError):
    """A file's sha256 does not match the expected one."""

    def __init__(self, path: str | Path, expected: str, actual: str) -> None:
        self.path, self.expected, self.actual = Path(path), expected, actual
        what = "sha256 prefix" if len(expected) < 64 else "sha256"
        super().__init__(
            f"checksum mismatch for {self.path}: expected {what} {expected}, got {actual}"
        )


class DownloadError(VprkitError, OSError):
    """A download failed or was cut short; a kept `.part` file is resumed on the next try."""


class ManualDownloadRequired(VprkitError, FileNotFoundError):
    """An official file that cannot be downloaded automatically is not in the cache."""


class ChecksumFileNotFoundError(VprkitError, FileNotFoundError):
    """`verify` or `pin` of a path that names no file."""


def vprkit_home() -> Path:
    """The cache root: `$VPRKIT_HOME`, else `~/.cache/vprkit`."""
    env = os.environ.get("VPRKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vprkit"


def weights_dir() -> Path:
    """Where official weight files are cached: `<vprkit_home()>/weights`."""
    return vprkit_home() / "weights"


def _entry(name: str) -> WeightsEntry:
    try:
        return OFFICIAL_WEIGHTS[name]
    except KeyError:
        raise VprkitError(
            f"unknown weights name {name!r}; known names: {', '.join(OFFICIAL_WEIGHTS)}"
        ) from None


# ---------------------------------------------------------------------------------------
# Pinned checksums: `<VPRKIT_HOME>/pinned_sha256.txt`, one `<sha256>  <name>` per line


def pins_file() -> Path:
    """Where `vprkit weights pin` records checksums: `<vprkit_home()>/pinned_sha256.txt`."""
    return vprkit_home() / "pinned_sha256.txt"


_PIN_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum's text and binary marks


def pinned_checksums() -> dict[str, str]:
    """The pinned sha256 per name (an official name or a file name); empty without pins."""
    path = pins_file()
    if not path.is_file():
        return {}
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _PIN_LINE.fullmatch(line.rstrip())
        if match is None:
            raise VprkitError(
                f"{path}, line {number}: expected `<64 hex digits>  <name>` (sha256sum "
                f"format), got {line!r}"
            )
        pins[match[2]] = match[1].lower()
    return pins


def _default_pin_name(path: Path) -> str:
    entry = next((e for e in OFFICIAL_WEIGHTS.values() if e.filename == path.name), None)
    return entry.name if entry else path.name


def pin(path: str | Path, name: str | None = None) -> tuple[str, str]:
    """Record `path`'s sha256 under `name` (default: the official name whose file name it
    has, else its file name) in `pins_file()`, replacing an older pin of that name. Refused
    when the file fails a checksum already known for that name. Returns (name, sha256)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChecksumFileNotFoundError(f"no such file: {path}")
    name = (name or _default_pin_name(path)).strip()
    if not name or "\n" in name:
        raise VprkitError(f"invalid pin name {name!r}")
    actual = sha256_file(path)
    entry = OFFICIAL_WEIGHTS.get(name)
    if entry is not None and entry.checksum and not actual.startswith(entry.checksum):
        raise ChecksumError(path, entry.checksum, actual)
    pins = {**pinned_checksums(), name: actual}
    target = pins_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_text("".join(f"{sha}  {key}\n" for key, sha in pins.items()))
    return name, actual


def _expected(name: str | None) -> list[tuple[str, str]]:
    """Every checksum known for `name`: (hex, where it comes from); the table's, then a pin."""
    known = []
    entry = OFFICIAL_WEIGHTS.get(name) if name else None
    if entry is not None and entry.checksum:
        kind = "sha256" if entry.sha256 else "sha256 prefix"
        known.append((entry.checksum, f"the official {kind} of {name!r}"))
    pinned = pinned_checksums().get(name) if name else None
    if pinned:
        known.append((pinned, f"the pin of {name!r} in {pins_file()}"))
    return known


def _normalize_hash(value: str, what: str, allow_prefix: bool) -> str:
    value = value.strip().lower()
    shortest = 8 if allow_prefix else 64
    if not re.fullmatch(r"[0-9a-f]+", value) or not shortest <= len(value) <= 64:
        need = "8 to 64 hex digits" if allow_prefix else "64 hex digits"
        raise VprkitError(f"invalid {what} {value!r}: expected {need}")
    return value


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes START-END/TOTAL` or `bytes */TOTAL` -> (START, TOTAL); None where absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _resume_hint(part: Path) -> str:
    size = part.stat().st_size if part.exists() else 0
    if size == 0:
        return ""
    return (
        f"; the {size} bytes received so far are kept in {part}, run the same command "
        "again to resume the download"
    )


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming a partial `.part` with a Range
    request, then check the length and the sha256 (or its prefix) and rename into place.

    `timeout` (seconds) applies to connecting and to each read, not to the whole transfer.
    Raises `ChecksumError` (the bad `.part` is deleted) or `DownloadError` (a partial `.part`
    is kept for resuming).
    """
    dest = Path(dest)
    if sha256 is not None:
        sha256 = _normalize_hash(sha256, "sha256", allow_prefix=False)
    if sha256_prefix is not None:
        sha256_prefix = _normalize_hash(sha256_prefix, "sha256 prefix", allow_prefix=True)
    if dest.is_dir():
        raise IsADirectoryError(f"download destination {dest} is a directory, not a file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")

    response, offset = _request(url, part, timeout)
    if response is None:
        # The previous run received everything but stopped before the rename.
        return _finish(part, dest, sha256, sha256_prefix)
    with response:
        start = _start_of_body(response, offset)
        if start is None:
            # A range we did not ask for: appending it would corrupt the file.
            response.close()
            part.unlink()
            return download(url, dest, sha256, sha256_prefix, progress, chunk_size, timeout)
        offset, total = start
        received, digest = _receive(
            response, url, part, offset, total, progress=progress, chunk_size=chunk_size
        )

    if total is not None and received < total:
        raise DownloadError(
            f"download of {url} ended early: got {received} of {total} bytes{_resume_hint(part)}"
        )
    if total is not None and received > total:
        part.unlink()
        raise DownloadError(
            f"download of {url} gave {received} bytes, more than the announced {total}; "
            "the partial file was deleted, try again"
        )
    return _finish(part, dest, sha256, sha256_prefix, digest)


def _request(url: str, part: Path, timeout: float) -> tuple[http.client.HTTPResponse | None, int]:
    """Open `url` from the end of `part` (a Range request when it holds bytes already).
    Returns (response, offset), or (None, offset) when `part` already holds the whole file
    (HTTP 416 for a range that starts at its end). A `.part` that does not fit the server's
    file is deleted and the request made again from byte 0."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "vprkit", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout), offset
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, total = _parse_content_range(exc.headers.get("Content-Range"))
            exc.close()
            if total == offset:
                return None, offset
            part.unlink()  # the .part does not fit the file on the server: start over
            return _request(url, part, timeout)
        raise DownloadError(
            f"download of {url} failed: HTTP {exc.code} {exc.reason}{_resume_hint(part)}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"download of {url} failed: {reason}{_resume_hint(part)}; check the network, or "
            f"fetch the file yourself and give it as --weights FILE"
        ) from None


def _start_of_body(
    response: http.client.HTTPResponse, offset: int
) -> tuple[int, int | None] | None:
    """(the byte the response body starts at, the file's total length if announced), or None
    when the server answered a range other than the one asked for."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if offset and response.getcode() == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            return None
        if total is None and length is not None:
            total = offset + length
        return offset, total
    # 200 (the server ignores Range, or there was nothing to resume): start over.
    return 0, length


def _receive(
    response: http.client.HTTPResponse,
    url: str,
    part: Path,
    offset: int,
    total: int | None,
    *,
    progress: bool,
    chunk_size: int,
) -> tuple[int, str]:
    """Write the response body into `part` from byte `offset` (appending to the bytes
    already there, or starting the file when `offset` is 0); returns the bytes the file
    then holds and their sha256."""
    digest = hashlib.sha256()
    if offset:
        with open(part, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    received = offset
    with (
        open(part, "ab" if offset else "wb") as out,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name[: -len(".part")],
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        while True:
            try:
                chunk = response.read(chunk_size)
            except (OSError, http.client.HTTPException) as exc:
                out.close()
                raise DownloadError(
                    f"download of {url} was interrupted ({type(exc).__name__}: {exc})"
                    f"{_resume_hint(part)}"
                ) from None
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, digest.hexdigest()


def _finish(
    part: Path,
    dest: Path,
    sha256: str | None,
    sha256_prefix: str | None,
    actual: str | None = None,
) -> Path:
    """Check a complete `.part` and rename it to `dest`."""
    if sha256 or sha256_prefix:
        actual = actual or sha256_file(part)
        for expected in (sha256, sha256_prefix):
            if expected and not actual.startswith(expected):
                part.unlink()  # a bad file must not be resumed on the next try
                raise ChecksumError(dest, expected, actual)
    os.replace(part, dest)
    return dest


def fetch(name: str, dest_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The path of official weights `name`, downloading them into the cache (or `dest_dir`)
    if needed. A cached file whose checksum is known is verified before it is returned."""
    entry = _entry(name)
    path = Path(dest_dir) if dest_dir is not None else weights_dir()
    path = path.expanduser() / entry.filename
    known = _expected(name)
    pinned = pinned_checksums().get(name)
    if entry.sha256 and pinned and pinned != entry.sha256:
        raise VprkitError(
            f"the pin of {name!r} in {pins_file()} ({pinned}) differs from its official "
            f"sha256 ({entry.sha256}); remove that line"
        )
    if path.is_file():
        actual = sha256_file(path) if known else None
        failed = next(((hex_, _) for hex_, _ in known if not actual.startswith(hex_)), None)
        if failed is None:
            return path
        if entry.url is None:
            raise ChecksumError(path, failed[0], actual)
        print(f"vprkit: {path} fails its checksum, downloading it again", file=sys.stderr)
    if entry.url is None:
        raise ManualDownloadRequired(
            f"{entry.name!r} ({entry.filename}) cannot be downloaded automatically: "
            f"{entry.manual}, and save it as {path}, or pass the file's path instead of "
            f"the name {entry.name!r}"
        )
    return download(
        entry.url,
        path,
        sha256=entry.sha256 or pinned,
        sha256_prefix=entry.sha256_prefix,
        progress=progress,
    )


def resolve_weights(name_or_path: str | Path) -> Path:
    """An existing file path as is, or the cached (downloaded if needed) official weights of
    that name. Anything else is a ValueError listing the known names."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if isinstance(name_or_path, str) and name_or_path in OFFICIAL_WEIGHTS:
        return fetch(name_or_path)
    if path.is_dir():
        raise VprkitError(f"weights {str(name_or_path)!r} is a directory, not a weight file")
    raise VprkitError(
        f"weights {str(name_or_path)!r} is neither an existing file nor a known name; "
        f"known names: {', '.join(OFFICIAL_WEIGHTS)}"
    )


# `vprkit weights verify` exit statuses (also in its --help).
EXIT_VERIFIED, EXIT_FAILED, EXIT_UNKNOWN = 0, 1, 3


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `verify`: status is "ok", "mismatch" or "no known checksum"."""

    path: Path
    status: str
    actual: str
    expected: str | None = None
    source: str | None = None
    name: str | None = None  # the name its checksum was looked up under

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def exit_status(self) -> int:
        return {"ok": EXIT_VERIFIED, "mismatch": EXIT_FAILED}.get(self.status, EXIT_UNKNOWN)

    def message(self) -> str:
        if self.status == "ok":
            return f"ok: {self.path} matches {self.source} ({self.expected})"
        if self.status == "mismatch":
            return (
                f"mismatch: {self.path} has sha256 {self.actual}, but {self.source} "
                f"is {self.expected}"
            )
        named = f" {self.name}" if self.name and self.name != self.path.name else ""
        return (
            f"no known checksum for {self.name or self.path.name!r}: {self.path} has sha256 "
            f"{self.actual}; once you trust it, `vprkit weights pin {self.path}{named}` "
            "records it"
        )


def verify(path: str | Path, name: str | None = None, sha256: str | None = None) -> VerifyResult:
    """Check a file against `sha256` (full or a prefix of 8+ hex digits), or against every
    checksum known for `name` (the table's and a pin; default: the official name with the
    file's file name, else the file name). Never "ok" without a checksum to compare."""
    path = Path(path).expanduser()
    if name is not None and sha256 is not None:
        raise VprkitError("give either a weights name or a sha256 to verify against, not both")
    if not path.is_file():
        raise ChecksumFileNotFoundError(f"no such file: {path}")
    if sha256 is not None:
        known = [(_normalize_hash(sha256, "sha256", allow_prefix=True), "the given hash")]
    else:
        if name is not None and name not in OFFICIAL_WEIGHTS and name not in pinned_checksums():
            raise VprkitError(
                f"unknown weights name {name!r}: neither official ({', '.join(OFFICIAL_WEIGHTS)}) "
                f"nor pinned in {pins_file()}"
            )
        name = name or _default_pin_name(path)
        known = _expected(name)
    actual = sha256_file(path)
    if not known:
        return VerifyResult(path, "no known checksum", actual, None, None, name)
    for expected, source in known:
        if not actual.startswith(expected):
            return VerifyResult(path, "mismatch", actual, expected, source, name)
    expected = max((e for e, _ in known), key=len)
    return VerifyResult(path, "ok", actual, expected, " and ".join(s for _, s in known), name)


# ---------------------------------------------------------------------------------------
# `vprkit weights ...`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `list`, `download`, `verify` and `pin` sub-commands to the `weights` verb."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser(
        "list",
        help="list the official weight files and whether they are cached",
        formatter_class=fmt,
    )
    p = sub.add_parser(
        "download",
        help="download official weights into the cache, resuming a partial download",
        formatter_class=fmt,
    )
    p.add_argument("name", metavar="NAME", help="weights name, as shown by `vprkit weights list`")
    p.add_argument(
        "--dest",
        metavar="DIR",
        default=None,
        help="directory to save into instead of the cache, $VPRKIT_HOME/weights "
        "(~/.cache/vprkit/weights when VPRKIT_HOME is unset)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p = sub.add_parser(
        "verify",
        help="check a file's sha256 against the official one, a pinned one or a given hash",
        description="Check a file's sha256 against every checksum known for it: the official "
        "table's and the user's pins (`vprkit weights pin`), or --sha256.",
        epilog=f"exit status: {EXIT_VERIFIED} verified; {EXIT_FAILED} mismatch or error; "
        f"{EXIT_UNKNOWN} no known checksum (the file's sha256 is printed: pin it with "
        "`vprkit weights pin FILE` once you trust it). A script can run `verify && use`.",
        formatter_class=fmt,
    )
    p.add_argument("file", metavar="FILE", help="the weight file to check")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--name",
        default=None,
        help="official or pinned weights name to check against; without it (and without "
        "--sha256) the official name with the file's file name, else the file name",
    )
    group.add_argument(
        "--sha256", metavar="HEX", default=None, help="expected sha256, or a prefix of it"
    )
    p = sub.add_parser(
        "pin",
        help="record a file's sha256 (in $VPRKIT_HOME/pinned_sha256.txt) for verify and "
        "download to check",
        description="Record FILE's sha256 under NAME in $VPRKIT_HOME/pinned_sha256.txt "
        "(sha256sum format; ~/.cache/vprkit/pinned_sha256.txt when VPRKIT_HOME is unset). "
        "`verify`, `download` and loading by name then require that checksum. Pin only a file "
        "you trust (e.g. checked against its publisher's checksum).",
        formatter_class=fmt,
    )
    p.add_argument("file", metavar="FILE", help="the weight file to pin")
    p.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        default=None,
        help="name to pin it under (default: the official name with FILE's file name, else "
        "FILE's file name)",
    )


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def models_using(name: str) -> list[str]:
    """The registered models whose `ModelInfo.weights` name official weights `name`."""
    from vprkit.models.registry import list_models, model_info

    return [m for m in list_models() if name in model_info(m).weights]


def display_path(path: Path) -> str:
    """`path` with the home folder shown as `~` (as the README and --help write it)."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except (ValueError, RuntimeError):  # not under home, or no home folder
        return str(path)


def _list_table() -> str:
    folder = weights_dir()
    pins = pinned_checksums()
    rows = [("NAME", "FILE", "SIZE", "CACHED", "SHA256", "MODELS", "SOURCE")]
    for e in OFFICIAL_WEIGHTS.values():
        path = folder / e.filename
        cached = path.is_file()
        if e.sha256:
            known = "known"
        elif e.name in pins:
            known = "pinned"
        elif e.sha256_prefix:
            known = f"prefix {e.sha256_prefix}"
        else:
            known = "not known"
        size = _human_size(path.stat().st_size) if cached else "-"
        models = ",".join(models_using(e.name)) or "-"
        rows.append(
            (e.name, e.filename, size, "yes" if cached else "no", known, models, e.url or "manual")
        )
    # Pad every column but the last (the long URLs).
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    ]
    manual = sorted({e.manual for e in OFFICIAL_WEIGHTS.values() if e.manual})
    lines += ["", f"cache: {display_path(folder)}"]
    if pins:
        lines.append(f"pinned checksums: {display_path(pins_file())}")
    lines += [f"manual: {note}, then save it in the cache" for note in manual]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run `vprkit weights ACTION`; 0 on success, 1 on a failure (message on stderr); for
    `verify`, 3 when no checksum is known for the file (`EXIT_UNKNOWN`)."""
    try:
        if args.action == "list":
            print(_list_table())
            return 0
        if args.action == "download":
            print(fetch(args.name, dest_dir=args.dest, progress=not args.no_progress))
            return 0
        if args.action == "verify":
            result = verify(args.file, name=args.name, sha256=args.sha256)
            if result.ok:
                print(result.message())
            else:
                print(f"vprkit weights: {result.message()}", file=sys.stderr)
            return result.exit_status
        if args.action == "pin":
            name, sha256 = pin(args.file, args.name)
            print(f"pinned {name!r}: sha256 {sha256} in {display_path(pins_file())}")
            return 0
    except (ValueError, OSError) as exc:
        # Expected failures (bad name, checksum, network, missing file): one line, no trace.
        print(f"vprkit weights: error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unknown action {args.action!r}")
