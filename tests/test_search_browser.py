"""The search page in a real headless browser against a real server (``make test-slow``).

``clipforge serve`` runs in a subprocess on a free port of 127.0.0.1; Debian's chromium, driven
by its chromedriver through selenium, types a colour query, checks the first thumbnails show
that colour, clicks the first one and checks the search by that image puts it first.  A
screenshot goes to the test's folder, and to ``$CLIPFORGE_SCREENSHOT`` when set (that is how
docs/figures/search_page.png is made: ``make figure-search``).

Needs Debian's chromium and chromium-driver, which ``make test-slow`` installs (``make browser``).
Under ``make test-slow`` (``CLIPFORGE_REQUIRE_BROWSER=1``) a missing browser fails the test with
the command to run; a plain ``pytest -m slow`` skips it with that command as the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _search_helpers import collection

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

try:
    import httpx
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as error:  # the test and search extras
    MISSING_PACKAGE: str | None = f"{error.name} ({sys.executable} -m pip install -e '.[test,search]')"
else:
    MISSING_PACKAGE = None

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def needs_a_browser() -> None:
    """Fails under ``make test-slow`` when the browser is missing, skips (saying why) elsewhere."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        missing.append("run: make browser (or sudo apt-get install chromium chromium-driver)")
    if MISSING_PACKAGE:
        missing.append(MISSING_PACKAGE)
    if missing:
        message = "the browser test needs " + "; ".join(missing)
        if os.environ.get("CLIPFORGE_REQUIRE_BROWSER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

# Flags for a container without a display, a sandbox or a network beyond 127.0.0.1.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from clipforge.search.build import build_index

    c = collection(tmp_path_factory)
    index = tmp_path_factory.mktemp("browser") / "index"
    build_index(f"pairs:{c.images}", index, model=c.model, progress=False)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", str(index), "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start: {process.stdout.read()}")
        time.sleep(0.2)
    yield {"url": url, "c": c}
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results figure.card")


def test_type_a_query_see_the_colour_first_click_to_search_by_image(server, browser, tmp_path):
    browser.get(server["url"] + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "images indexed" in d.find_element(By.ID, "status").text)
    box = browser.find_element(By.ID, "query")
    box.send_keys("a red circle")
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda d: len(cards(d)) > 0 and "results for" in d.find_element(By.ID, "status").text)
    first_eight = [card.find_element(By.CSS_SELECTOR, "figcaption").text for card in cards(browser)[:8]]
    assert all(" red " in caption for caption in first_eight), first_eight
    # Every thumbnail loaded (naturalWidth is 0 for a broken image).
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    shot = tmp_path / "search_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CLIPFORGE_SCREENSHOT"):
        Path(os.environ["CLIPFORGE_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, os.environ["CLIPFORGE_SCREENSHOT"])

    clicked = cards(browser)[3]
    clicked_id = clicked.get_attribute("data-id")
    clicked.click()
    wait.until(lambda d: "results for image" in d.find_element(By.ID, "status").text)
    assert cards(browser)[0].get_attribute("data-id") == clicked_id

    box.clear()
    box.send_keys("x" * 400 + " " + "y" * 99)  # at the page's limit; the server answers, no error shown
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda d: "results for" in d.find_element(By.ID, "status").text)
    assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
