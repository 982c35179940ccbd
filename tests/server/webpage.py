"""The browser and the live server the chat page's tests drive, and what they do with the page: Debian's
chromium, headless, through the system chromedriver (selenium-manager never runs), against `gemma4 serve`
on the embedded model with an API key."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gemma4 import store

KEY = "page-test-key"
NAME = store.EMBEDDED_NAME
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Debian's /usr/bin/chromium is a shell wrapper; the driver is given the browser itself where it is there
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and Path(p).is_file()), None)


@pytest.fixture(scope="module")
def driver():
    if CHROMIUM is None or not Path(CHROMEDRIVER).is_file():
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # a Service with the driver's path: selenium-manager is never asked to find or download one
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gemma4.cli", "serve", "--port", str(port), "--api-key", KEY,
                             "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # the native kernels may be built by a neighbour first
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def api(server, body, status=200):
    """The server's own answer to a chat request, as the page's request would get it."""
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def wait(driver, script, timeout=60, *args):
    deadline = time.time() + timeout
    while not (value := driver.execute_script(script, *args)):
        assert time.time() < deadline, f"timed out waiting for: {script}"
        time.sleep(0.05)
    return value


def errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def fresh(driver, server, key=KEY, ready=True):
    """The page with nothing kept but the key; with `ready`, returns once the server's models are listed."""
    # the storage is set on one of the page's files (same origin), so the page never starts without the key
    driver.get(server + "/static/style.css")
    driver.execute_script("localStorage.clear(); if (arguments[0]) localStorage.setItem('gemma4.apiKey', arguments[0])",
                          key)
    driver.get_log("browser")  # what earlier tests left there (reading empties it)
    driver.get(server + "/")
    if ready:
        wait(driver, "return document.querySelector('#model option')")


def set_field(driver, id, value):
    field = driver.find_element("id", id)
    field.clear()
    field.send_keys(str(value))


LAST = "const m = [...document.querySelectorAll('.msg.assistant')].pop(); "


def ask(driver, text):
    from selenium.webdriver.common.keys import Keys

    n = driver.execute_script("return document.querySelectorAll('.msg.assistant').length")
    driver.find_element("id", "prompt").send_keys(text, Keys.ENTER)
    wait(driver, "return document.querySelectorAll('.msg.assistant').length > arguments[0]", 10, n)


def watch(driver, timeout=120) -> list[int]:
    """The last answer's text length at each look until it is no longer streaming."""
    lengths = []
    deadline = time.time() + timeout
    while True:
        state, length = driver.execute_script(LAST + "return [m.dataset.state, m.querySelector('.answer').textContent.length]")
        if state != "streaming":
            return lengths
        lengths.append(length)
        assert time.time() < deadline, "the answer never ended"
        time.sleep(0.02)


def kept(driver) -> list[dict]:
    """The conversations as the page kept them in localStorage."""
    return json.loads(driver.execute_script("return localStorage.getItem('gemma4.conversations')"))


def screenshot(driver, tmp_path):
    from PIL import Image

    path = tmp_path / "webui.png"
    assert driver.save_screenshot(str(path))
    assert Image.open(path).size[0] >= 1000  # the whole window, not an empty capture
    if os.environ.get("GEMMA4_SCREENSHOT"):
        shutil.copyfile(path, os.environ["GEMMA4_SCREENSHOT"])


def running(server) -> float:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith("gemma4_running_requests "):
            return float(line.split()[1])
    raise AssertionError("no gemma4_running_requests in /metrics")
