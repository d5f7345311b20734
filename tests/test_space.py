"""The FIKA Assistant Space: driven through gradio_client and through a real headless Chromium."""

from __future__ import annotations

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
    import fika.spaces.app as app

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_adapter, smoke_report, tmp_path_factory):
    """The app on a local port: tiny base + the adapter (also as the compare adapter), the smoke report."""
    _, report = smoke_report
    app = load_app_module().build_app(None, str(tiny_adapter), str(tiny_adapter), str(report))
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


def test_a_refused_message_never_reaches_the_model_and_history_is_bounded(served):
    app = load_app_module()
    refused = "x" * 5000
    history = [
        {"role": "user", "content": refused},
        {"role": "assistant", "content": app.check_message(refused)},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there."},
    ]
    messages = app.conversation("And now?", history, "Be brief.")
    assert [m["content"] for m in messages] == ["Be brief.", "Hello", "Hi there.", "And now?"]
    from fika.config import ModelConfig
    from fika.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name="tiny"))
    long_chat = [{"role": "system", "content": "Be brief."}]
    for i in range(40):
        long_chat += [
            {"role": "user", "content": f"question {i} " * 20},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    long_chat.append({"role": "user", "content": "the last question"})
    inputs = app.fit_history(tokenizer, long_chat, 600)
    text = tokenizer.decode(inputs["input_ids"][0])
    assert inputs["input_ids"].shape[1] <= 600 and "Be brief." in text and "the last question" in text
    assert "question 0 " not in text and "question 39 " in text  # the oldest turns went first


def test_adapters_that_are_missing_or_broken_are_refused(tiny_adapter, tmp_path):
    from fika.errors import FikaError

    app = load_app_module()
    with pytest.raises(FikaError, match="--adapter: .*no-such-adapter not found"):
        app.Assistant("tiny", str(tmp_path / "no-such-adapter"), None)
    with pytest.raises(FikaError, match="no adapter given"):
        app.build_app(base="tiny")
    assert app.Assistant("tiny", None, None).choices == ["base model"]  # --base-only
    both = app.Assistant(None, str(tiny_adapter), str(tiny_adapter))
    assert both.choices == ["base model", "tuned adapter", "compare adapter"] and both.model_name == "tiny"


EVIL_CODE = """
from pathlib import Path
Path(__file__).with_name("RAN").write_text("the adapter's code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def test_an_adapters_own_metadata_never_turns_on_remote_code(tiny_adapter, tmp_path, capsys):
    """Someone else's adapter names a base model with custom code and asks for trust_remote_code: refused."""
    from fika.config import ModelConfig
    from fika.model import load_tokenizer

    base = tmp_path / "evil-base"
    base.mkdir()
    (base / "evil.py").write_text(EVIL_CODE)
    (base / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}')
    load_tokenizer(ModelConfig(name="tiny")).save_pretrained(base)
    adapter = tmp_path / "their-adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "fika.yaml").write_text(f"model: {{name: {base}, trust_remote_code: true, chat_template: chatml}}\n")
    assert main(["space", "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert (
        "ships its own Python code, which fika runs only when you ask for it" in err
        and len(err.strip().splitlines()) == 1
    )
    assert not (base / "RAN").exists() and not list(tmp_path.rglob("RAN"))


def test_leaderboard_reads_a_real_smoke_report(smoke_report):
    _, report = smoke_report
    table, best, curves = load_app_module().leaderboard(str(report))
    assert len(table) == 8 and list(table["rank"]) == list(range(1, 9))
    assert "r, alpha" in table.columns and best.startswith("# The best trial") and curves.endswith("curves.png")
    assert "train loss avg10 @6" in table.columns  # every trial at the rung, as in the report


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
            ],
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
        box = page.locator("textarea").first
        box.fill("y" * 4100)  # refused by the validator: it stays in the box, never in the chat
        box.press("Enter")
        page.get_by_text("the limit is 4,000").first.wait_for(timeout=30_000)
        chat = " ".join(page.locator(".message").all_inner_texts())
        assert "Hello from a real browser" in chat and "y" * 100 not in chat
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
    server = subprocess.Popen(
        [venv / "bin" / "python", "app.py"],
        cwd=out,
        env={"GRADIO_SERVER_PORT": str(port), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
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
