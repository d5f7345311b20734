"""Publishing on the Hugging Face Hub: an adapter with a generated model card (`fika push`), or an exported
Space folder (`fika space export --push`). The card and the repository id are huggingface_hub's own
(`ModelCard`, `ModelCardData`, `validate_repo_id`).

The token comes from the usual places (the HF_TOKEN variable, or the file `hf auth login` writes) and is
passed to `huggingface_hub` only: it is never written into a card, a file or a line fika prints. Without a
token or a network, the command fails with one line; `--dry-run` prints what would be uploaded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from fika.adapters import not_an_adapter
from fika.errors import FikaError, first_line
from fika.files import read_json
from fika.hub import hub_reachable
from fika.masking import mask_secrets
from fika.sources import local_path


def check_repo(repo: str) -> None:
    """Refuses a repository id that is not USER/NAME as the hub spells them (huggingface_hub's own rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        valid = repo.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise FikaError(f"--repo: {repo!r} is not allowed: give USER/NAME (a Hugging Face repository id)")


def hub_datasets(config: dict) -> list[str]:
    """The hub datasets a run trained on (local files are not named on the card)."""
    names = []
    for source in (config.get("data") or {}).get("sources") or []:
        path = str(source.get("path", ""))
        try:
            is_local = path.startswith("builtin:") or local_path(path) is not None
        except FikaError:
            is_local = True
        if not is_local:
            names.append(path)
    return names


def report_lines(report: Path | None) -> list[str]:
    """The search's best trial against its baseline, from a report folder."""
    if report is None:
        return []
    summary = read_json(report / "report.json")
    if summary is None:
        raise FikaError(f"--report: {report} is not a fika report folder (no report.json)")
    import pandas as pd

    table = pd.read_csv(report / "trials.csv")
    done = table[table["status"] == "completed"]
    lines = [f"Found by the fika search `{summary['name']}`: {len(table)} trials, {len(done)} completed."]
    if len(done):
        best = done.iloc[0]
        lines.append(f"- best trial `{best['trial']}`: eval loss {best['eval_loss']:.4f}")
        base = table[table["baseline"]]
        if len(base) and base.iloc[0]["status"] == "completed":
            lines.append(f"- baseline (the base config's own values): eval loss {base.iloc[0]['eval_loss']:.4f}")
    return lines


def model_card(adapter: Path, repo: str, report: Path | None) -> str:
    """A model card: front matter (base_model, library_name peft, datasets, tags), results, training config."""
    config_path = adapter / "fika.yaml"
    if not config_path.exists():
        raise FikaError(f"{adapter}: no fika.yaml beside the adapter; push an adapter folder written by `fika train`")
    config = yaml.safe_load(config_path.read_text()) or {}
    base = (config.get("model") or {}).get("name", "")
    base = "HuggingFaceTB/SmolLM2-135M-Instruct" if base == "builtin:smollm2-135m-instruct" else base
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base,
        library_name="peft",
        tags=["fika", "lora", "peft", "trl", "sft"],
        datasets=hub_datasets(config) or None,
    )
    result = read_json(adapter.parent / "result.json") or {}
    lora, train = config.get("lora") or {}, config.get("train") or {}
    body = [
        f"# {repo.split('/')[-1]}",
        "",
        f"A LoRA adapter for `{base}`, trained with fika (trl SFTTrainer + peft).",
        "",
        *report_lines(report),
        "",
        "## Training",
        "",
        f"- LoRA: r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"target modules {lora.get('target_modules')}",
        f"- learning rate {train.get('learning_rate')} ({train.get('lr_scheduler')}), batch {train.get('batch_size')} x "
        f"accumulation {train.get('gradient_accumulation')}, {result.get('steps', train.get('max_steps'))} steps",
    ]
    if result.get("eval_loss") is not None:
        eval_size = config.get("data", {}).get("eval_size")
        body.append(f"- final eval loss {result['eval_loss']:.4f} on {eval_size} held-out conversations")
    usage = [
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")',
        "```",
    ]
    body += [
        "",
        "## Use",
        "",
        *usage,
        "",
        "## The training config",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).strip(),
        "```",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return mask_secrets(str(card))


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise FikaError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (use --dry-run to see the upload)")
    return token


def file_list(folder: Path) -> list[str]:
    return [f"  {p.relative_to(folder)} ({p.stat().st_size:,} bytes)" for p in sorted(folder.rglob("*")) if p.is_file()]


def upload(folder: Path, repo: str, repo_type: str, private: bool) -> str:
    """Creates (or reuses) the repository and uploads `folder`; one line on any hub failure."""
    token = hub_token()
    if not hub_reachable():
        raise FikaError("the Hugging Face hub cannot be reached (no network, or HF_HUB_OFFLINE is set)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(
            repo,
            repo_type=repo_type,
            private=private,
            exist_ok=True,
            **({"space_sdk": "gradio"} if repo_type == "space" else {}),
        )
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type=repo_type, commit_message="Upload with fika"
        )
    except Exception as err:  # HTTP errors, permissions, quota: the message, not the traceback
        raise FikaError(f"upload to {repo} failed: {mask_secrets(first_line(err))}") from None
    return f"uploaded to {getattr(info, 'commit_url', repo)}"


def push_adapter(
    adapter: Path, repo: str, report: str | None = None, dry_run: bool = False, private: bool = False
) -> str:
    """Uploads an adapter folder with a generated README.md (the model card); the adapter folder is not changed."""
    check_repo(repo)
    adapter = adapter.expanduser()
    if not (adapter / "adapter_config.json").exists():
        raise FikaError(not_an_adapter(adapter))
    card = model_card(adapter, repo, Path(report).expanduser() if report else None)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "upload"
        shutil.copytree(adapter, staged)
        (staged / "README.md").write_text(card)
        if dry_run:
            return "\n".join([f"would upload to https://huggingface.co/{repo}:", *file_list(staged), "", card])
        return upload(staged, repo, "model", private)


def push_folder(folder: Path, repo: str, repo_type: str, dry_run: bool = False, private: bool = False) -> str:
    """Uploads an exported Space folder as is."""
    check_repo(repo)
    if dry_run:
        return "\n".join([f"would upload to https://huggingface.co/spaces/{repo}:", *file_list(folder)])
    return upload(folder, repo, repo_type, private)
