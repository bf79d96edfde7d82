"""The chat page at / in a real headless browser: Debian's chromium driven by selenium through the
system chromedriver (nothing downloads a browser). The browser is installed here when it is absent
and apt-get can; otherwise these tests are skipped, saying why."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time

import pytest
import torch
from conftest import running_server, slowed

from omnigpt.config import ServeConfig, VisionConfig
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.server import Service
from omnigpt.tokenizer import AUDIO, IMAGE

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
VISION = VisionConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=16, shuffle=2)


def _install_browser() -> str | None:
    """Installs Debian's chromium and chromium-driver when missing; the reason when it cannot."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return (
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"could not install chromium: {' '.join(command)}: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    reason = _install_browser()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service as DriverService

    os.environ["SE_OFFLINE"] = "true"  # selenium's own driver manager never reaches the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(code_model):
    """A model that sees, served slowly enough (20 ms a step) to watch its replies grow."""
    gpt, tok = code_model
    torch.manual_seed(1)
    model = MultimodalGPT(gpt, VISION, None, tok.token_id(IMAGE), tok.token_id(AUDIO)).eval()
    service = Service(ServeConfig())
    service.attach(model, tok, "tiny")
    slowed(service.engine, 0.02)
    submitted = []
    submit = service.engine.submit

    def recording(work, on_event):
        submitted.append(work)
        return submit(work, on_event)

    service.engine.submit = recording
    with running_server(service) as url:
        yield url, service, submitted


WATCH_REPLY = """
window.lengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.assistant .text');
  if (replies.length) window.lengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


def _open(browser, url):
    browser.get(url)
    _wait(lambda: "tiny" in browser.find_element("id", "status").text, "the page to connect")
    browser.execute_script(WATCH_REPLY)


def _send(browser, text):
    box = browser.find_element("id", "input")
    box.send_keys(text)
    browser.find_element("id", "send").click()


def _reply_state(browser):
    return browser.execute_script(
        "const r = document.querySelectorAll('.msg.assistant'); return r.length ? "
        "[r[r.length-1].dataset.done || '', r[r.length-1].querySelector('.text').textContent] : null"
    )


def _wait(condition, what, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_reply_streams_into_the_page(browser, page):
    url, _, _ = page
    _open(browser, url)
    _send(browser, "def add")
    _wait(lambda: (_reply_state(browser) or [""])[0] == "finished", "the reply to finish")
    lengths = [n for n in browser.execute_script("return window.lengths") if n]
    _, text = _reply_state(browser)
    assert text and lengths[-1] == len(text)
    assert len(set(lengths)) >= 3  # the text grew at least twice before it ended


def test_stop_aborts_the_reply_and_frees_the_server(browser, page, monkeypatch):
    url, service, _ = page
    submit = service.engine.submit

    def past_the_end(
        work, on_event
    ):  # a sampled reply may end at once: this one runs to the context
        work.opts, work.stop_ids = dataclasses.replace(work.opts, stop_at_eot=False), frozenset()
        return submit(work, on_event)

    monkeypatch.setattr(service.engine, "submit", past_the_end)
    _open(browser, url)
    _send(browser, "class")
    _wait(lambda: len((_reply_state(browser) or ["", ""])[1]) >= 3, "the reply to start")
    browser.find_element("id", "stop").click()
    _wait(lambda: _reply_state(browser)[0] == "stopped", "the page to show the stop")
    stopped_at = _reply_state(browser)[1]
    _wait(lambda: service.engine.running == 0, "the server to drop the request", 5)
    time.sleep(0.2)
    assert _reply_state(browser)[1] == stopped_at  # nothing more arrives
    assert len(stopped_at) < 80  # it was cut short (the context allows ~85 tokens)


def test_an_attached_image_reaches_the_model(browser, page, tmp_path):
    from PIL import Image

    url, _, submitted = page
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (220, 20, 20)).save(path)
    _open(browser, url)
    browser.find_element("id", "attach").send_keys(str(path))
    _wait(lambda: "red.png" in browser.find_element("id", "attachments").text, "the attachment")
    submitted.clear()
    _send(browser, "what is it")
    _wait(lambda: (_reply_state(browser) or [""])[0] == "finished", "the reply to finish")
    [work] = submitted
    assert work.inputs["images"].shape == (1, 3, 32, 32)
    red, green = work.inputs["images"][0, 0].mean(), work.inputs["images"][0, 1].mean()
    assert red > 0.5 > -0.5 > green  # the picture itself, in [-1, 1]
    assert VISION.tokens <= len(work.prompt)
