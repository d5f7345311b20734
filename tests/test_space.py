"""The FIKA Assistant Space: driven through gradio_client and through a real headless Chromium."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fika.cli import main

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def load_app_module():
    spec = importlib.util.spec_from_file_location("fika_space_app", REPO / "spaces" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_adapter, smoke_report, tmp_path_factory):
    """The app on a local port: tiny base + the adapter, a missing compare adapter, the smoke report."""
    _, report = smoke_report
    app = load_app_module().build_app(
        None, str(tiny_adapter), str(tmp_path_factory.mktemp("x") / "missing"), str(report)
    )
    port = free_port()
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


def test_chat_streams_a_reply_through_the_real_client(served):
    from gradio_client import Client

    client = Client(served[1], verbose=False)
    job = client.submit("Hello, who are you?", "tuned adapter", "Be brief.", 24, 1.0, 0.95, api_name="/chat")
    partials = list(job)
    assert len(partials) > 3  # streamed piece by piece, not in one go
    assert partials[-1].strip() and all(b.startswith(a) for a, b in zip(partials, partials[1:], strict=False))


def test_bad_input_gets_a_message_not_a_crash(served):
    from gradio_client import Client

    client = Client(served[1], verbose=False)
    assert client.predict("   ", "tuned adapter", "", 16, 0.0, 0.9, api_name="/chat") == "Please type a message."
    too_long = client.predict("x" * 5000, "base model", "", 16, 0.0, 0.9, api_name="/chat")
    assert "the limit is 4,000" in too_long
    a, b = client.predict("Hi", "base model", "tuned adapter", "", 16, 0.0, 0.9, api_name="/compare")
    assert isinstance(a, str) and isinstance(b, str) and (a or b)


def test_missing_adapter_is_a_clear_message_at_start(tiny_adapter, tmp_path):
    app_module = load_app_module()
    assistant = app_module.Assistant("tiny", str(tmp_path / "no-such-adapter"), None)
    assert assistant.choices == ["base model"]
    assert assistant.warnings == [
        f"The tuned adapter directory `{tmp_path / 'no-such-adapter'}` was not found: it is not served."
    ]
    both = app_module.Assistant(None, str(tiny_adapter), str(tiny_adapter))
    assert both.choices == ["base model", "tuned adapter", "compare adapter"] and both.model_name == "tiny"


def test_leaderboard_reads_a_real_smoke_report(smoke_report):
    _, report = smoke_report
    table, best, curves = load_app_module().leaderboard(str(report))
    assert len(table) == 8 and list(table["rank"]) == list(range(1, 9))
    assert "r, alpha" in table.columns and best.startswith("# The best trial") and curves.endswith("curves.png")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_a_person_types_a_message_in_chromium_and_reads_the_reply(served, tmp_path):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],  # fmt: skip
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(served[1], wait_until="load")
        box = page.get_by_placeholder("Ask anything...")
        box.wait_for(timeout=60_000)
        box.fill("Hello from a real browser")
        box.press("Enter")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.message, [data-testid=\"bot\"]')].some("
            "m => m.innerText.trim().length > 0 && !m.innerText.includes('Hello from a real browser'))",
            timeout=60_000,
        )
        assert page.get_by_text("Hello from a real browser").count() >= 1
        page.screenshot(path=str(tmp_path / "chat.png"))
        page.get_by_role("tab", name="Leaderboard").click()
        page.get_by_text("Ranked trials of").wait_for(timeout=10_000)
        browser.close()


@pytest.mark.slow
def test_exported_space_starts_from_its_own_requirements(tiny_adapter, smoke_report, tmp_path):
    """`fika space export` + a fresh venv from the folder's requirements.txt + `python app.py`."""
    out = tmp_path / "space"
    _, report = smoke_report
    assert main(["space", "export", "--adapter", str(tiny_adapter), "--report", str(report), "--out", str(out)]) == 0
    assert (out / "README.md").read_text().startswith("---\ntitle: FIKA Assistant")
    assert {p.name for p in out.iterdir()} >= {
        "app.py",
        "requirements.txt",
        "README.md",
        "fika",
        "adapter",
        "report",
        "space.yaml",
    }
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = REPO / "constraints" / "cpu.txt"
    subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "-c", constraints, "-r", out / "requirements.txt"], check=True
    )
    port = free_port()
    server = subprocess.Popen([venv / "bin" / "python", "app.py"], cwd=out, env={"GRADIO_SERVER_PORT": str(port),
                              "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})  # fmt: skip
    try:
        import time

        from gradio_client import Client

        deadline = time.time() + 180
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert server.poll() is None and time.time() < deadline, "the exported Space did not start"
                time.sleep(1)
        reply = client.predict("Hi", "tuned adapter", "", 16, 1.0, 0.9, api_name="/chat")
        assert isinstance(reply, str) and reply
    finally:
        server.terminate()
        server.wait()
