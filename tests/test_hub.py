"""Publishing: the adapter's model card and the upload's file list (`--dry-run`), a Space export for the Hub,
and the token that never reaches anything fika prints or writes."""

from __future__ import annotations

import secrets

import yaml

from fika.cli import main


def scan(paths, token: str) -> list[str]:
    """Every file under `paths` that holds the token."""
    found = []
    for root in paths:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and token.encode() in path.read_bytes():
                found.append(str(path))
    return found


def test_push_dry_run_shows_the_card_and_files_and_never_the_token(
    tiny_adapter, smoke_report, tmp_path, monkeypatch, capsys
):
    _, report = smoke_report
    token = "hf_" + secrets.token_hex(20)
    monkeypatch.setenv("HF_TOKEN", token)
    assert main(["push", str(tiny_adapter), "--repo", "someone/fika-tiny", "--report", str(report), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "would upload to https://huggingface.co/someone/fika-tiny:" in out.out
    assert "README.md" in out.out and "adapter_model.safetensors" in out.out and "adapter_config.json" in out.out
    card = out.out[out.out.index("---\n") :]
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "tiny" and "fika" in front["tags"]
    assert "Found by the fika search `smoke`" in card and "best trial" in card and "## The training config" in card
    assert token not in out.out + out.err

    assert main(["push", str(tiny_adapter), "--repo", "someone/fika-tiny"]) == 2  # no network in the tests
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fika push: error: the Hugging Face hub cannot be reached (no network, or HF_HUB_OFFLINE is set)"]

    space = tmp_path / "space"
    args = [
        "space",
        "export",
        "--adapter",
        str(tiny_adapter),
        "--report",
        str(report),
        "--out",
        str(space),
        "--push",
        "someone/fika-space",
        "--dry-run",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "would upload to https://huggingface.co/spaces/someone/fika-space:" in out.out and "app.py" in out.out
    front = yaml.safe_load((space / "README.md").read_text().split("---\n")[1])
    assert front["sdk"] == "gradio" and front["models"] == []  # the tiny base is no hub model
    assert token not in out.out + out.err
    assert scan([space, report, tiny_adapter.parent], token) == []


def test_a_spaces_card_names_the_hub_models_it_serves(tmp_path):
    """The Space card's front matter (huggingface_hub's SpaceCard) lists the base and the hub adapters."""
    import shutil

    from fika.model import BUILTIN_SMOLLM2
    from fika.spaces.export import APP_DIR, name_models

    readme = tmp_path / "README.md"
    shutil.copy(APP_DIR / "README.md", readme)
    name_models(readme, {"base": BUILTIN_SMOLLM2, "adapter": "adapter", "compare": "someone/other-adapter"})
    front = yaml.safe_load(readme.read_text().split("---\n")[1])
    assert front["models"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "someone/other-adapter"]
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
