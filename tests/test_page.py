"""`edgeenc serve`: the local page over a results file, checked over HTTP and in a real browser.

The browser test drives the system Chromium (Debian's `chromium` and `chromium-driver`, which .ci/run
installs) with Selenium; it skips only where they are not installed. Set EDGEENC_PAGE_SCREENSHOT=PATH to
keep its screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("PIL")

CLI = [sys.executable, "-c", "from edgeenc.cli import main; main()"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def station(tiny_eat_bundle, birds_wav, tmp_path_factory):
    """A results file of `watch` over two recordings (one since deleted), and its page being served."""
    root = tmp_path_factory.mktemp("station")
    inbox, db = root / "inbox", root / "results.sqlite"
    inbox.mkdir()
    samples, rate = sf.read(birds_wav, dtype="float32")
    sf.write(inbox / "dawn.wav", samples, rate)
    sf.write(inbox / "gone.wav", samples[::-1], rate)  # other content: the same would be an alias, not processed
    done = subprocess.run([*CLI, "watch", str(inbox), "--bundle", str(tiny_eat_bundle[0]), "--db", str(db), "--once",
                           "--settle", "0", "--window", "1", "--threshold", "0.5", "--top-k", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (inbox / "gone.wav").unlink()
    port = free_port()
    server = subprocess.Popen([*CLI, "serve", str(db), "--port", str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    yield {"url": url, "db": db, "port": port, "inbox": inbox}
    server.terminate()
    server.wait(10)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read()


def event_ids(station) -> dict[str, list[str]]:
    from edgeenc.runtime.recorder import open_read_only

    store = open_read_only(station["db"])
    try:
        events = store.events()
    finally:
        store.close()
    return {name: [e.id for e in events if e.path.endswith(name)] for name in ("dawn.wav", "gone.wav")}


def test_the_page_its_images_and_clips_over_http(station):
    status, kind, body = get(station["url"] + "/")
    page = body.decode()
    assert status == 200 and kind.startswith("text/html")
    assert 'id="events"' in page and 'class="event"' in page and '<svg id="chart"' in page
    assert "random weights" in page and "model.onnx on onnxruntime" in page
    ids = event_ids(station)
    status, kind, png = get(f"{station['url']}/spectrogram/{ids['dawn.wav'][0]}.png")
    assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")
    status, kind, wav = get(f"{station['url']}/clip/{ids['dawn.wav'][0]}.wav")
    assert status == 200 and kind == "audio/wav" and wav.startswith(b"RIFF")
    # A clip whose recording is gone: a message, on the page and from the clip's own address, never a 500.
    assert "gone.wav is no longer there" in page
    status, _, message = get(f"{station['url']}/clip/{ids['gone.wav'][0]}.wav")
    assert status == 404 and b"no longer there" in message
    assert get(f"{station['url']}/clip/9999-9999.wav")[0] == 404


def test_the_page_never_blocks_the_writer(station, tiny_eat_bundle, birds_wav):
    samples, rate = sf.read(birds_wav, dtype="float32")
    sf.write(station["inbox"] / "later.wav", 0.5 * samples, rate)
    done = subprocess.run([*CLI, "watch", str(station["inbox"]), "--bundle", str(tiny_eat_bundle[0]), "--db",
                           str(station["db"]), "--once", "--settle", "0", "--window", "1", "--threshold", "0.5",
                           "--top-k", "2", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "later.wav" in get(station["url"] + "/")[2].decode()


def test_a_port_in_use_and_a_missing_results_file_are_messages(station, tmp_path):
    busy = subprocess.run([*CLI, "serve", str(station["db"]), "--port", str(station["port"])], capture_output=True,
                          text=True, timeout=60)
    assert busy.returncode == 2 and f"port {station['port']} on 127.0.0.1 cannot be used" in busy.stderr
    missing = subprocess.run([*CLI, "serve", str(tmp_path / "none.sqlite")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no such results file" in missing.stderr


def test_the_results_file_is_opened_read_only(station):
    from edgeenc.runtime.recorder import open_read_only

    store = open_read_only(station["db"])
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.conn.execute("DELETE FROM windows")
    finally:
        store.close()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed "
                                                            "(.ci/run installs them)")
def test_the_page_in_a_real_browser(station, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1300", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(station["url"] + "/")
        newest = browser.find_elements(By.CSS_SELECTOR, "tr.event")[0]
        assert newest.find_element(By.CSS_SELECTOR, "td.label").text.startswith("random_class_")
        deadline = time.time() + 20
        while time.time() < deadline and not browser.execute_script(
                "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"):
            time.sleep(0.2)
        widths = browser.execute_script("return [...document.querySelectorAll('img.spectrogram')]"
                                        ".map(i => i.naturalWidth)")
        assert widths and all(w == 480 for w in widths)  # every spectrogram loaded
        assert browser.find_elements(By.CSS_SELECTOR, "#chart rect")  # the chart has bars
        assert browser.find_elements(By.CSS_SELECTOR, "audio[src^='/clip/']")
        shot = Path(os.environ.get("EDGEENC_PAGE_SCREENSHOT") or tmp_path / "page.png")
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()
