"""`medllava web`: the Gradio chat's pieces on CPU, and the whole page driven in a real headless browser.

The browser test needs Debian's chromium + chromedriver and selenium (`apt-get install chromium chromium-driver`,
`pip install selenium`); it is marked `browser` and skipped where they are missing. With MEDLLAVA_SCREENSHOT=PATH
it also saves a screenshot of the answered page; MEDLLAVA_WEB_MODEL=FOLDER and MEDLLAVA_WEB_IMAGE=FILE drive another
model and image (README's picture: the demo's exported model).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

MAX_NEW = 12


@pytest.fixture(scope="module")
def talking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose random LLM writes text, with a model card holding a disclaimer."""
    from medllava.model import build_model, save_model
    from medllava.presets import make_tiny_pair

    root = tmp_path_factory.mktemp("web_model")
    model, processor = build_model(*map(str, make_tiny_pair(root / "pair", "clip", "llama")))
    save_model(model, processor, root / "model")
    (root / "model" / "README.md").write_text("# m\n\n## Medical disclaimer\n\nNot a medical device.\nReview it.\n\n"
                                              "## Licence\n\napache-2.0\n")
    return root / "model"


def test_disclaimer_comes_from_the_model_card(talking_model: Path, tmp_path: Path) -> None:
    from medllava.web import DEFAULT_DISCLAIMER, disclaimer_for

    assert disclaimer_for(talking_model) == "Not a medical device. Review it."
    assert disclaimer_for(tmp_path) == DEFAULT_DISCLAIMER


def test_dicom_upload_goes_through_the_chosen_window() -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    from medllava.imaging import Window, load_image
    from medllava.web import FILE_WINDOW, read_uploads

    path = pydicom_data.get_testdata_file("CT_small.dcm")
    lung = read_uploads(path, "lung")[0]
    assert list(lung.getdata()) == list(load_image(path, window=Window.parse("lung")).getdata())
    assert list(read_uploads(path, FILE_WINDOW)[0].getdata()) == list(load_image(path).getdata())
    assert list(lung.getdata()) != list(read_uploads(path, "bone")[0].getdata())


def test_streamed_answer_equals_chat_and_keeps_the_conversation(talking_model: Path, phantom: Path) -> None:
    from medllava.chat import ChatSession
    from medllava.model import load_model
    from medllava.web import answer_stream, read_uploads

    model, processor = load_model(talking_model)
    image = read_uploads(str(sorted((phantom / "images").rglob("*.png"))[0]), "")[0]
    session = ChatSession(model, processor, max_new_tokens=MAX_NEW)
    session.add_image(image)
    expected = session.ask("Is any lesion visible?")
    state = {"messages": [], "images": [], "pending": [image]}
    partials = list(answer_stream(model, processor, state, "Is any lesion visible?", MAX_NEW))
    assert expected and partials[-1] == expected and len(partials) >= 2
    assert state["pending"] is None and len(state["images"]) == 1 and len(state["messages"]) == 2
    second = list(answer_stream(model, processor, state, "Why?", MAX_NEW))[-1]
    assert second == session.ask("Why?")  # the second turn sees the first, as chat does


def test_the_app_builds(talking_model: Path) -> None:
    from medllava.model import load_model
    from medllava.web import build_app

    model, processor = load_model(talking_model)
    app = build_app(model, processor, title="m", disclaimer="Not a medical device.")
    assert isinstance(app, gr.Blocks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser_model(talking_model: Path) -> Path:
    return Path(os.environ.get("MEDLLAVA_WEB_MODEL") or talking_model)


@pytest.fixture()
def web_server(browser_model: Path, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = tmp_path / "web.log"
    proc = subprocess.Popen([sys.executable, "-m", "medllava.cli", "web", str(browser_model), "--port", str(port),
                             "--max-new-tokens", str(MAX_NEW)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        import urllib.request

        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(log.read_text()[-3000:]) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _browser_missing() -> str:
    """Why the browser test cannot run here ('' when it can), decided before its server starts."""
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (pip install selenium)"
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        return "needs Debian's chromium and chromium-driver"
    return ""


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "ready")
def test_browser_upload_ask_and_read_the_streamed_answer(web_server: str, browser_model: Path, phantom: Path) -> None:
    from selenium import webdriver

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from medllava.chat import ChatSession
    from medllava.model import load_model
    from medllava.web import read_uploads

    image_path = Path(os.environ.get("MEDLLAVA_WEB_IMAGE") or sorted((phantom / "images").rglob("*.png"))[0])
    question = "Is any lesion visible?"
    model, processor = load_model(browser_model)
    session = ChatSession(model, processor, max_new_tokens=MAX_NEW)
    session.add_image(read_uploads(str(image_path), "")[0])
    expected = session.ask(question)

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        driver.get(web_server)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        assert "not a medical device" in driver.find_element(By.ID, "disclaimer").text.lower()  # the card's words
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(image_path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
        driver.find_element(By.ID, "ask").click()

        def answered(d: object) -> bool:
            bubbles = driver.find_elements(By.CSS_SELECTOR, "#chat .message, #chat [data-testid='bot']")
            text = driver.find_element(By.ID, "chat").text
            return bool(bubbles) and expected in text

        wait.until(answered)
        assert question in driver.find_element(By.ID, "chat").text
        shot = os.environ.get("MEDLLAVA_SCREENSHOT")
        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(shot)
        driver.find_element(By.ID, "reset").click()
        wait.until(lambda d: expected not in driver.find_element(By.ID, "chat").text)
    finally:
        driver.quit()


def test_web_beyond_loopback_warns_loudly_and_signs_in_with_a_password(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 27: `medllava web` had no authentication and no warning when bound beyond loopback."""
    import logging

    from gradio.utils import _parse_file_size

    from medllava.web import launch_options

    with caplog.at_level(logging.WARNING, logger="medllava.web"):
        assert "auth" not in launch_options("127.0.0.1", 7860)
        assert not caplog.records
        open_options = launch_options("0.0.0.0", 7860)
    assert "auth" not in open_options and "WITHOUT A PASSWORD" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medllava.web"):
        options = launch_options("0.0.0.0", 7860, user="rad", password="s3cret-pass", max_upload_mb=5)
    assert options["auth"] == ("rad", "s3cret-pass") and _parse_file_size(options["max_file_size"]) == 5 * 2**20
    # reviewer finding: a fractional or large limit became text Gradio cannot parse ("0.5mb", "1e+03mb")
    for mb in (0.5, 1000.0, 20):
        assert _parse_file_size(launch_options("127.0.0.1", 7860, max_upload_mb=mb)["max_file_size"]) == int(mb * 2**20)
    with pytest.raises(ValueError, match="max_upload_mb"):
        launch_options("127.0.0.1", 7860, max_upload_mb=0)
    assert "sign-in required" in caplog.text and "s3cret-pass" not in caplog.text


def test_web_answers_hold_to_the_servers_limits(talking_model: Path, phantom: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Issue 27: `medllava web` checked neither the prompt against the model's context nor how many images a
    conversation gathers, and an answer whose page went away kept generating. Each limit is now a clear error
    before any generation, and closing the answer stream stops its generation."""
    from medllava.model import load_model
    from medllava.web import FILE_WINDOW, WebLimitError, answer_stream, read_uploads

    model, processor = load_model(talking_model)
    model.eval()
    image = read_uploads(str(sorted((phantom / "images").rglob("*.png"))[0]), FILE_WINDOW)[0]
    context = model.config.get_text_config().max_position_embeddings
    state = {"messages": [], "images": [], "pending": [image]}
    with pytest.raises(WebLimitError, match="context"):
        next(answer_stream(model, processor, state, "why " * context, MAX_NEW))
    assert state["pending"] == [image] and not state["messages"]  # nothing asked, the upload kept
    crowded = {"messages": [], "images": [image] * 8, "pending": [image]}
    with pytest.raises(WebLimitError, match="images"):
        next(answer_stream(model, processor, crowded, "Any lesion?", MAX_NEW, max_images=8))
    # a page that goes away: the generator is closed after its first piece, and generation stops there
    model.generation_config.eos_token_id = None
    import logging
    import re

    stream = answer_stream(model, processor, {"messages": [], "images": [], "pending": [image]}, "Describe.", 400)
    next(stream)
    with caplog.at_level(logging.INFO, logger="medllava.web"):
        stream.close()  # waits for the generating thread, which the stop ends within a token
    made = re.search(r"generation stopped after (\d+) of 400 tokens", caplog.text)
    assert made and int(made.group(1)) < 400, caplog.text
