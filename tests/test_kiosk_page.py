"""The kiosk page in a real browser: Debian's Chromium, driven by Playwright, fed a fake camera made from the
shipped photograph, against the real server on loopback. It starts the camera, asks the emotion task, streams
the answer, shows the parsed JSON and the stage timings; a screenshot is kept and looked at."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Debian's chromium is not installed (apt-get install chromium)")


def fake_camera(photo: Path, path: Path, frames: int = 30) -> Path:
    """A Y4M clip (what Chromium's fake capture device reads) of the photograph, 640x480."""
    import cv2

    image = cv2.resize(cv2.imread(str(photo)), (640, 480))
    yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
    with open(path, "wb") as out:
        out.write(b"YUV4MPEG2 W640 H480 F30:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            out.write(b"FRAME\n" + yuv.tobytes())
    return path


@pytest.fixture(scope="module")
def server(tiny_bundle):
    import uvicorn

    from facellava.runtime.pipeline import Pipeline
    from facellava.runtime.serve.app import ServeConfig, create_app

    pipeline = Pipeline.open(tiny_bundle)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(pipeline, ServeConfig(default_max_tokens=24))
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=30)
    pipeline.close()


def test_the_kiosk_page_asks_about_the_camera_frame(server, face_photo, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    camera = fake_camera(face_photo, tmp_path / "camera.y4m")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera}"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"{server}/?autostart=1")
            page.wait_for_function("document.getElementById('camera').videoWidth > 0", timeout=30_000)
            page.select_option("#task", "emotion")
            page.click("#ask")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
            answer = page.inner_text("#answer")
            structured = page.inner_text("#structured")
            timings = page.inner_text("#timings")
            screenshot = tmp_path / "kiosk.png"
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert answer.strip()
    parsed = json.loads(answer)  # the emotion task's schema constrained the decoding
    assert json.loads(structured) == parsed
    assert "vision" in timings and "first token" in timings and "ms" in timings
    assert all(url.startswith(server) or url.startswith("data:") for url in requests), requests  # offline page
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (700, 1100, 3) and pixels.std() > 20  # a page with the frame on it, not a blank
