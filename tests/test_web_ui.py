"""The web UI end to end: `diffbase serve` in a subprocess, driven by headless Chromium (Debian's chromium and
chromedriver, installed here when missing and possible; otherwise the test skips and says why): upload a
person and a garment, run try-on on the toy model, read the result image back from the page, and keep a
screenshot (outputs/test-artifacts/web_ui_tryon.png). Bad uploads (not an image, too large, a decompression
bomb) each show an error in the page, and the next request still works."""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "examples"
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'diffbase[ui]')")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffbase.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--max-upload-mb", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
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
        pytest.fail("diffbase serve did not answer within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield d
    d.quit()


def inputs(tmp: Path) -> tuple[Path, Path]:
    """A person and a garment: the photos in ../shared/examples, or synthetic ones where a clone has none."""
    if (SHARED / "person_woman1.png").is_file() and (SHARED / "garment_cloth_1.png").is_file():
        return SHARED / "person_woman1.png", SHARED / "garment_cloth_1.png"
    from diffbase.data.synthetic import make_item

    item = make_item(0, "test", 0, (96, 128))
    item.person.save(tmp / "person.png")
    item.garment.save(tmp / "garment.png")
    return tmp / "person.png", tmp / "garment.png"


def upload(d, elem_id: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def clear(d, elem_id: str) -> None:
    from selenium.webdriver.common.by import By

    for button in d.find_elements(
        By.CSS_SELECTOR, f"#{elem_id} button[aria-label*='Clear'], #{elem_id} button[aria-label*='clear']"
    ):
        button.click()


def wait_for(predicate, seconds: float = 120.0, what: str = "") -> object:
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def result_image(d) -> Image.Image | None:
    from selenium.webdriver.common.by import By

    found = d.find_elements(By.CSS_SELECTOR, "#tryon-result img")
    src = found[0].get_attribute("src") if found else None
    if not src:
        return None
    with urllib.request.urlopen(src, timeout=10) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_try_on_in_the_browser_and_bad_uploads_stay_contained(server, driver, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    person, garment = inputs(tmp_path)
    d = driver
    d.get(server)
    wait_for(lambda: d.find_elements(By.ID, "tryon-run"), 60, "the page")
    upload(d, "tryon-person", person)
    upload(d, "tryon-garment", garment)
    time.sleep(2)  # the uploads reach the server
    d.find_element(By.ID, "tryon-run").click()
    image = wait_for(lambda: result_image(d), 180, "the try-on result")
    assert image.size == Image.open(person).size  # pasted back at the person's own size
    assert np.asarray(image).std() > 1  # a picture, not a blank
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "web_ui_tryon.png"))

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)  # 400 million pixels in a small file
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    assert bomb.stat().st_size < 2**20 < big.stat().st_size
    cases = (
        (not_image, "person: not a readable image"),
        (bomb, "is 20000x20000, beyond the limit of"),  # named by its size, not as a "bomb"
        (big, "exceed the maximum allowed size"),
    )  # the last one: gradio's own limit (--max-upload-mb)
    for bad, message in cases:
        clear(d, "tryon-person")
        upload(d, "tryon-person", bad)
        time.sleep(2)
        d.find_element(By.ID, "tryon-run").click()
        text = wait_for(lambda m=message: m in d.find_element(By.TAG_NAME, "body").text, 60, f"'{message}' in the page")
        assert text
        d.save_screenshot(str(ARTIFACTS / f"web_ui_error_{bad.stem}.png"))
        d.get(server)  # a fresh page: the server is still there
        wait_for(lambda: d.find_elements(By.ID, "tryon-run"), 60, "the page again")
    upload(d, "tryon-person", person)
    upload(d, "tryon-garment", garment)
    time.sleep(2)
    d.find_element(By.ID, "tryon-run").click()
    assert wait_for(lambda: result_image(d), 180, "a result after the bad uploads").size == Image.open(person).size


def test_other_tabs_answer_through_the_api(server, tmp_path) -> None:
    """The upscale tab on the toy FLUX.1 and the training monitor, through gradio's client (the same endpoints
    the page calls)."""
    from gradio_client import Client, handle_file

    from diffbase.data.synthetic import make_item

    client = Client(server, verbose=False)
    item = make_item(0, "test", 1, (32, 32))
    item.person.save(tmp_path / "small.png")
    toy = str(ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy")
    out = client.predict(handle_file(str(tmp_path / "small.png")), toy, 2.0, 0.35, 4, 0, api_name="/upscale")
    assert Image.open(out).size == (64, 64)
    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    Image.new("RGB", (16, 16), (0, 255, 0)).save(run / "validation" / "step-000002.png")
    plot, grid, status = client.predict(str(run), api_name="/monitor")
    assert Image.open(plot).size[0] > 100 and Image.open(grid).size == (16, 16) and "step 2" in status


def test_bad_input_is_one_line_under_the_field_label(server, tmp_path) -> None:
    """The bad-input table's cases that a tab can be given, through the endpoints the page calls: each error
    names the field by its label, and nothing runs."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    person, garment = tmp_path / "p.png", tmp_path / "g.png"
    Image.new("RGB", (32, 32), (200, 120, 90)).save(person)
    Image.new("RGB", (32, 32), (20, 60, 200)).save(garment)
    small_mask, black = tmp_path / "m.png", tmp_path / "b.png"
    Image.new("L", (16, 16), 255).save(small_mask)
    Image.new("L", (32, 32), 0).save(black)
    sd15 = str(ROOT / "src" / "diffbase" / "zoo_weights" / "sd15-toy")
    flux = str(ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy")
    p, g = handle_file(str(person)), handle_file(str(garment))
    tryon = [p, g, None, "", "catvton", sd15, "", "32x32", 5, 0]
    cases = {
        "steps: expected a whole number at least 1": ("/tryon", [*tryon[:8], -1, 0]),
        "HxW: expected each side at least": ("/tryon", [*tryon[:7], "0x0", 5, 0]),
        "mask (optional): the mask is 16x16": ("/tryon", [p, g, handle_file(str(small_mask)), *tryon[3:]]),
        "mask (optional): the mask is empty": ("/tryon", [p, g, handle_file(str(black)), *tryon[3:]]),
        "garment box: 40,40,60,60 is not a box inside": ("/tryon", [p, g, None, "40,40,60,60", *tryon[4:]]),
        "scale: expected a number above 0": ("/upscale", [p, flux, -1.0, 0.35, 4, 0]),
        "SD1.5 model folder: try-on runs on an SD1.5 folder": ("/tryon", [*tryon[:5], flux, *tryon[6:]]),
        "takes 324 tiles, more than this server's 64": ("/upscale", [p, flux, 127.0, 0.35, 4, 0]),
        "scale 200.0: a 6400x6400 result is beyond the limit": ("/upscale", [p, flux, 200.0, 0.35, 4, 0]),
    }
    for message, (api, args) in cases.items():
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(*args, api_name=api)
