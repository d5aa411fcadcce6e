"""End to end: the demo page in headless Chromium, driven by Selenium. Moving the eps slider must
change the adversarial image and the guard's verdict on it (accepted at eps 0, rejected at a large
eps). Skips only when chromium or chromedriver is not installed (.ci/run installs both)."""
from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_demo import demo_image, small_guard

from serving.demo import build_demo, launch
from serving.demo_engine import DemoEngine

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
TIMEOUT = 90  # seconds for the page to react, generous for a loaded 2-core CI machine

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="the browser test needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
    ),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's own pandas deprecations
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(digits, tmp_path_factory) -> Iterator[str]:
    """The demo for a small digits guard (saved and loaded as `safetynet demo --guard` does),
    served on a free localhost port, showing one of its test digits at eps 0."""
    folder = tmp_path_factory.mktemp("demo")
    small_guard().save(folder / "guard")
    engine = DemoEngine.from_options(guard=folder / "guard")
    example = folder / "digit.png"
    cv2.imwrite(str(example), np.round(demo_image(engine, digits) * 255).astype(np.uint8))
    port = _free_port()
    demo = build_demo(engine, [str(example)], eps=0.0)
    launch(demo, port=port, examples=[str(example)], block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1280,1700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _read(driver: webdriver.Chrome, css: str, attribute: str | None = None) -> str | None:
    """The text (or `attribute`) of the first element matching `css`; None while there is none, or
    while the page is re-rendering it (Gradio replaces elements when outputs arrive)."""
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return None if not found else found[0].text if attribute is None else found[0].get_attribute(attribute)
    except StaleElementReferenceException:
        return None


def _verdict(driver: webdriver.Chrome) -> str:
    """The guard's verdict on the adversarial image ("" while there is none)."""
    return _read(driver, "#verdict-after .verdict") or ""


def test_moving_the_eps_slider_changes_the_adversarial_image_and_the_verdict(demo_url, browser, tmp_path):
    browser.get(demo_url)
    wait = WebDriverWait(browser, TIMEOUT)
    wait.until(lambda d: _verdict(d).startswith("accepted") and _read(d, "#taylor img", "src"))
    image_before = wait.until(lambda d: _read(d, "#adversarial img", "src"))
    plot_before = wait.until(lambda d: _read(d, "#taylor img", "src"))
    assert "accepted" in wait.until(lambda d: _read(d, "#verdict-before"))

    slider = browser.find_element(By.CSS_SELECTOR, "#eps input[type=range]")
    width = slider.size["width"]
    # press near the left end (eps 0), drag to 90% of the range (eps 0.45), release
    (ActionChains(browser).move_to_element_with_offset(slider, -width // 2 + 2, 0).click_and_hold()
     .move_by_offset(int(0.9 * width) - 2, 0).release().perform())
    wait.until(lambda d: _verdict(d).startswith("rejected"))
    wait.until(lambda d: _read(d, "#taylor img", "src") not in (None, plot_before))  # the eps marker moved

    assert wait.until(lambda d: _read(d, "#adversarial img", "src")) != image_before
    assert 0.3 < float(wait.until(lambda d: _read(d, "#eps input[type=number]", "value"))) <= 0.5
    assert "accepted" in wait.until(lambda d: _read(d, "#verdict-before"))
    screenshot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    # clear the image, then upload another one (a colour JPEG of another size): a new original
    original = wait.until(lambda d: _read(d, "#original img", "src"))
    browser.find_element(By.CSS_SELECTOR, "#source button[aria-label='Remove Image']").click()
    wait.until(lambda d: "Choose or upload an image" in (_read(d, "#summary") or ""))
    upload = tmp_path / "upload.jpg"
    cv2.imwrite(str(upload), np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8))
    browser.find_element(By.CSS_SELECTOR, "#source input[type=file]").send_keys(str(upload))
    wait.until(lambda d: _read(d, "#original img", "src") not in (None, original) and _verdict(d))
