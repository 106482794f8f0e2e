"""The map page in a real headless browser (Debian's chromium and chromedriver, driven by
selenium), against `vprkit serve`'s app on a real socket on 127.0.0.1 and a real map: upload
a photo through the page, and check the estimate marker and the listed matches are the API's.

`VPRKIT_SERVE_SCREENSHOT=docs/serve_page.png` also writes the screenshot there (the README's).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip(
    "fastapi", reason="the serve extra is not installed: pip install 'vprkit[serve]'"
)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from PIL import Image  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="chromium and chromedriver are not installed (apt-get install chromium "
        "chromium-driver; .ci/run does)",
    ),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
TOKEN = "page-test-token"
WAIT_S = 60


@pytest.fixture(scope="module")
def server(serve_map):
    from vprkit.serve.app import ServeOptions, create_app
    from vprkit.serve.server import ServerThread

    app = create_app(serve_map, serve_map.localizer(), ServeOptions(token=TOKEN, workers=2))
    with ServerThread(app, host="127.0.0.1", port=0) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,760",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # nothing leaves this machine
    ):
        options.add_argument(arg)
    # The system driver, given by path: selenium's own driver download is never tried.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(script))


def test_the_page_localizes_an_uploaded_photo_as_the_api_does(
    server, browser, tiny_synthetic, tmp_path
):
    import httpx
    from selenium.webdriver.common.by import By

    query = sorted((tiny_synthetic / "vg" / "synthetic" / "images" / "test" / "queries").iterdir())[
        3
    ]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with open(query, "rb") as f:
        api = httpx.post(
            f"{server}/api/localize",
            files={"images": f},
            data={"top_k": "10"},
            headers=headers,
            timeout=60,
        ).json()["results"][0]

    browser.get(f"{server}/#token={TOKEN}")
    wait_for(browser, "return document.body.dataset.ready === 'true'")
    browser.find_element(By.ID, "photo-input").send_keys(str(query))
    state = wait_for(browser, "return document.body.dataset.state")
    assert state == "localized", browser.find_element(By.ID, "status").text

    # The estimate marker sits where the API puts the estimate (read back from the marker).
    where = browser.execute_script(
        "return vprkitPage.fromLatLng(vprkitPage.state.estimateMarker.getLatLng())"
    )
    assert where["east"] == pytest.approx(api["estimate"]["east"], abs=1e-6)
    assert where["north"] == pytest.approx(api["estimate"]["north"], abs=1e-6)
    assert browser.find_elements(By.CSS_SELECTOR, ".estimate-marker")
    # The listed matches and the match markers are the API's, in its order.
    ids = [m["id"] for m in api["matches"]]
    listed = browser.execute_script(
        "return [...document.querySelectorAll('#matches li')].map(li => Number(li.dataset.photoId))"
    )
    markers = browser.execute_script(
        "return vprkitPage.state.matchMarkers"
        ".map(m => [m.photoId, vprkitPage.fromLatLng(m.getLatLng())])"
    )
    assert listed == ids
    assert [m[0] for m in markers] == ids
    for (_, xy), match in zip(markers, api["matches"], strict=True):
        assert (xy["east"], xy["north"]) == pytest.approx((match["east"], match["north"]), abs=1e-6)
    # Their thumbnails came through the token-protected API and decoded.
    wait_for(
        browser,
        "return [...document.querySelectorAll('#matches img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )
    # Offline: every resource the page loaded came from this server.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(origins) <= {server, "null"}  # blob: URLs have the origin "null"

    shot = tmp_path / "serve_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("VPRKIT_SERVE_SCREENSHOT"):
        _save_small_png(shot, Path(target))


def test_the_photos_view_browses_the_map(server, browser, serve_map):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/#token={TOKEN}")
    wait_for(browser, "return document.body.dataset.ready === 'true'")
    drawn = browser.execute_script("return vprkitPage.state.photoMarkers.length")
    assert drawn == serve_map.count
    browser.find_element(By.ID, "tab-photos").click()
    cards = browser.find_elements(By.CSS_SELECTOR, "#photo-grid .photo")
    assert len(cards) == min(48, serve_map.count)
    assert int(cards[0].get_attribute("data-photo-id")) == 0
    cards[1].click()  # back to the map, at that photo
    assert browser.find_element(By.ID, "view-photos").get_attribute("hidden") is not None
    wait_for(browser, "return document.querySelector('.leaflet-popup-content img') !== null")


@contextmanager
def tile_server():
    """A stand-in for the user's XYZ tile server, on 127.0.0.1: one grey PNG for every tile,
    and the paths asked for."""
    asked: list[str] = []
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 210, 220)).save(out, "PNG")
    tile = out.getvalue()

    class Tiles(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(tile)))
            self.end_headers()
            self.wfile.write(tile)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Tiles)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{{z}}/{{x}}/{{y}}.png", asked
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_over_the_users_tiles_with_clustered_photos(serve_map, browser, tiny_synthetic):
    import httpx
    from selenium.webdriver.common.by import By

    from vprkit.serve.app import ServeOptions, create_app
    from vprkit.serve.server import ServerThread

    query = sorted((tiny_synthetic / "vg" / "synthetic" / "images" / "test" / "queries").iterdir())[
        5
    ]
    with tile_server() as (tiles, asked):
        # Clustering from 10 photos on: the code path a map of thousands takes.
        options = ServeOptions(tiles=tiles, tiles_attribution="test tiles", cluster_above=10)
        app = create_app(serve_map, serve_map.localizer(), options)
        with ServerThread(app) as url:
            with open(query, "rb") as f:
                api = httpx.post(f"{url}/api/localize", files={"images": f}, timeout=60).json()
            browser.get(f"{url}/")
            wait_for(browser, "return document.body.dataset.ready === 'true'")
            wait_for(browser, "return document.querySelectorAll('.marker-cluster').length > 0")
            wait_for(
                browser,
                "return [...document.querySelectorAll('img.leaflet-tile')]"
                ".some(i => i.complete && i.naturalWidth === 256)",
            )
            assert asked and all(p.endswith(".png") for p in asked)
            assert (
                "test tiles"
                in browser.find_element(By.CLASS_NAME, "leaflet-control-attribution").text
            )
            browser.find_element(By.ID, "photo-input").send_keys(str(query))
            assert wait_for(browser, "return document.body.dataset.state") == "localized"
            where = browser.execute_script(
                "return vprkitPage.fromLatLng(vprkitPage.state.estimateMarker.getLatLng())"
            )
    est = api["results"][0]["estimate"]
    assert where["latitude"] == pytest.approx(est["latitude"], abs=1e-9)
    assert where["longitude"] == pytest.approx(est["longitude"], abs=1e-9)


def _save_small_png(source: Path, target: Path) -> None:
    """The screenshot, palette-quantized (a README picture well under 300 KB)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as im:
        im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
            target, optimize=True
        )
