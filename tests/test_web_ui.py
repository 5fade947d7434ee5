"""The web UI end to end: `diffbase serve` in a subprocess, driven by headless Chromium (Debian's chromium and
chromedriver, installed here when missing and possible; otherwise the test skips and says why). Every tab runs
on its first click with the defaults; a mask painted on the person reaches try-on; a training job started from
the page runs to its export; bad uploads show one line in their own tab and the next request still works; a
screenshot of every tab is kept (outputs/test-artifacts/web_ui_<tab>.png). Through gradio's client (the
endpoints the page calls): concurrent requests all finish and the server's memory stays flat."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'diffbase[ui]')")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium")

TABS = {"tryon": "Try-on", "dreamfit": "DreamFit", "dreamo": "DreamO", "edit": "Edit / Fill", "upscale": "Upscale"}


def browser() -> tuple[str, str]:
    """(chromium, chromedriver), installing Debian's packages when they are missing and apt-get can."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0:
        pytest.skip("headless Chromium is not installed and this user cannot apt-get install chromium chromium-driver")
    proc = subprocess.run([apt, "install", "-y", "-q", "chromium", "chromium-driver"], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if proc.returncode != 0 or not all(found):
        pytest.skip(f"could not install chromium: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, output folder, process) of `diffbase serve` on the loopback."""
    port, out = free_port(), tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen([sys.executable, "-m", "diffbase.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--max-upload-mb", "1", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"diffbase serve exited: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("diffbase serve did not answer within 180 s")
    yield url, out, proc
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield d
    d.quit()


def wait_for(predicate, seconds: float = 180.0, what: str = "") -> object:
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def result_image(d, prefix: str) -> Image.Image | None:
    from selenium.webdriver.common.by import By

    found = d.find_elements(By.CSS_SELECTOR, f"#{prefix}-result img")
    src = found[0].get_attribute("src") if found else None
    if not src:
        return None
    with urllib.request.urlopen(src, timeout=10) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def status(d, prefix: str) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.ID, f"{prefix}-status").text.strip()


def open_tab(d, title: str) -> None:
    from selenium.webdriver.common.by import By

    for button in d.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
        if button.text.strip() == title:
            button.click()
            time.sleep(0.5)
            return
    raise AssertionError(f"no tab {title}")


def run_and_wait(d, prefix: str, out: Path) -> Image.Image:
    """Click the tab's run button; its result once the gallery on disk has one more of the tab's images."""
    from selenium.webdriver.common.by import By

    count = len(list(out.glob(f"gallery/*/[0-9][0-9][0-9][0-9]-{prefix}.png")))
    d.find_element(By.ID, f"{prefix}-run").click()

    def done():
        if status(d, prefix).startswith("error"):
            raise AssertionError(f"{prefix}: {status(d, prefix)}")
        return len(list(out.glob(f"gallery/*/[0-9][0-9][0-9][0-9]-{prefix}.png"))) > count

    wait_for(done, 240, f"the {prefix} result")
    kept = np.asarray(Image.open(newest(out, prefix)["path"]).convert("RGB"))
    return wait_for(lambda: (x := result_image(d, prefix)) is not None and np.array_equal(np.asarray(x), kept) and x,
                    30, f"the {prefix} result in the page")  # type: ignore[return-value]  # fmt: skip


def newest(out: Path, tab: str) -> dict:
    from diffbase.interface.gallery import read

    found = sorted(out.glob(f"gallery/*/[0-9][0-9][0-9][0-9]-{tab}.png"), key=lambda p: p.stat().st_mtime)
    return read(found[-1]) if found else {}


def test_every_tab_in_the_browser(server, driver, tmp_path) -> None:
    """Start a training job, run every tab on its first click, paint a mask on the person and try it on, a bad
    upload's one-line error in its tab, then screenshots of every tab (the gallery and train tabs last)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, out, _ = server
    d = driver
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.get(url)
    wait_for(lambda: d.find_elements(By.ID, "tryon-run"), 60, "the page")
    open_tab(d, "Train")  # the default experiment: the tiny SD1.5 LoRA on examples/shapes
    d.find_element(By.ID, "train-start").click()
    wait_for(lambda: "job 1:" in d.find_element(By.ID, "train-status").text, 60, "the job to be queued")
    for prefix, title in TABS.items():
        open_tab(d, title)
        image = run_and_wait(d, prefix, out)
        assert np.asarray(image).std() > 1, prefix  # a picture, not a blank
        d.save_screenshot(str(ARTIFACTS / f"web_ui_{prefix}.png"))

    open_tab(d, "Try-on")
    canvas = d.find_elements(By.CSS_SELECTOR, "#tryon-person canvas")[-1]
    strokes = ActionChains(d).move_to_element(canvas).move_by_offset(-20, -30).click_and_hold()
    for _ in range(6):
        strokes = strokes.move_by_offset(8, 10)
    strokes.release().perform()
    layers: list = []
    for settle in (1, 3, 8):  # the editor sends its strokes to the server after a pause; a loaded machine is slower
        time.sleep(settle)
        run_and_wait(d, "tryon", out)
        layers = newest(out, "tryon")["settings"]["person"]["layers"]
        if layers:
            break
    assert layers and np.asarray(Image.open(layers[0]).convert("RGBA"))[..., 3].max() > 0  # the strokes reached it
    d.save_screenshot(str(ARTIFACTS / "web_ui_tryon_painted.png"))

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    for button in d.find_elements(By.CSS_SELECTOR, "#tryon-garment button[aria-label*='Clear']"):
        button.click()
    d.find_element(By.CSS_SELECTOR, "#tryon-garment input[type=file]").send_keys(str(not_image))
    time.sleep(2)
    d.find_element(By.ID, "tryon-run").click()
    wait_for(lambda: "garment: not a readable image" in status(d, "tryon"), 60, "the garment's error in its tab")
    assert status(d, "tryon").count("\n") == 0 and "Traceback" not in status(d, "tryon")
    d.save_screenshot(str(ARTIFACTS / "web_ui_error_not_an_image.png"))

    open_tab(d, "Training monitor")
    d.save_screenshot(str(ARTIFACTS / "web_ui_monitor.png"))
    open_tab(d, "Gallery")
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 6, 30, "the session's gallery")
    upscaled = [x for x in d.find_elements(By.CSS_SELECTOR, "#gallery button") if "Upscale" in x.text]
    upscaled[0].click()  # select the upscale result: its settings, its file
    wait_for(lambda: "strength" in d.find_element(By.ID, "gallery-settings").text, 30, "the selected settings")
    d.save_screenshot(str(ARTIFACTS / "web_ui_gallery.png"))
    d.find_element(By.CSS_SELECTOR, "body").send_keys("\ue00c")  # Escape: leave the gallery's preview
    d.find_element(By.ID, "gallery-again").click()  # "use these settings again": back in its tab, fields filled
    wait_for(lambda: d.find_element(By.ID, "upscale-run").is_displayed(), 30, "the upscale tab")
    again = run_and_wait(d, "upscale", out)
    first = sorted(out.glob("gallery/*/[0-9][0-9][0-9][0-9]-upscale.png"))[0]  # the one the settings came from
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(first).convert("RGB")))
    open_tab(d, "Train")
    wait_for(lambda: "finished" in d.find_element(By.ID, "train-jobs").text, 600, "the training job to finish")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#train-progress, img"), 10, "its plots")
    time.sleep(2.5)  # one more refresh of the plots (the page's timer)
    d.save_screenshot(str(ARTIFACTS / "web_ui_train.png"))
    assert json.loads(next(out.glob("runs/sd15_lora-1/exports.json")).read_text())


def test_concurrent_requests_finish_and_memory_stays_flat(server, tmp_path) -> None:
    """8 requests at once through the page's endpoint all finish (queued, one model run at a time); the server's
    resident memory after 40 requests is within 10% of that after 10. Bad uploads (not an image, too many
    pixels) are one line in the tab's status and the next request runs."""
    from gradio_client import Client, handle_file

    url, _, proc = server
    picture = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (90, 140, 200)).save(picture)
    flux = str(ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy")

    def upscale(client: Client, image: Path = picture) -> tuple:
        return client.predict(handle_file(str(image)), flux, 2.0, 0.35, 3, 0, api_name="/upscale")

    clients = [Client(url, verbose=False) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(upscale, clients))
    assert all(r[1] == "" and Image.open(r[0]).size == (64, 64) for r in results)

    def rss() -> int:
        return int(next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                        if x.startswith("VmRSS")).split()[1])  # fmt: skip

    client = clients[0]
    for _ in range(2):  # 10 in all
        upscale(client)
    after_10 = rss()
    for _ in range(30):
        upscale(client)
    after_40 = rss()
    assert after_40 <= 1.1 * after_10, (after_10, after_40)

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)  # 400 million pixels in a small file
    image, message, _ = upscale(client, bomb)
    assert image is None and message.startswith("**error:** image: the image is 20000x20000, beyond the limit")
    image, message, _ = upscale(client)
    assert message == "" and Image.open(image).size == (64, 64)  # the server is still serving
