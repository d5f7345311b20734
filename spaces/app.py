"""FIKA Assistant: chat with a base model plus a fika LoRA adapter, compare two models, read a search's leaderboard.

A Hugging Face Space (sdk gradio) and a local app (`fika space`). Configured by environment variables:

  FIKA_BASE_MODEL      base model: a hub id, a local dir, builtin:smollm2-135m-instruct (default) or tiny;
                       by default the one the adapter was trained on (its fika.yaml)
  FIKA_ADAPTER         the tuned LoRA adapter: a local dir (from `fika train`) or a hub id
  FIKA_COMPARE_ADAPTER a second adapter for the Compare tab (for example the baseline's)
  FIKA_REPORT          a search report folder (reports/<name>) for the Leaderboard tab
  FIKA_MAX_INPUT_CHARS the longest message accepted (default 4000)
  FIKA_HISTORY_TOKENS  the most tokens of chat history sent to the model (default 1024; oldest turns go first)

An exported Space (`fika space export`) names its adapter, report and base in `space.yaml` beside this file.

Runs on a CPU (a free Space: 2 vCPU, 16 GB). Replies stream token by token with the chat template the model
was trained with; Gradio's queue serves concurrent users one generation at a time. A refused message (empty,
too long) never enters the chat history. An adapter folder's own files never turn on remote code: only the
person who starts the app can (`fika space --trust-remote-code`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE / "fika").is_dir():  # an exported Space carries its own copy of fika, and maybe the base GGUF
    sys.path.insert(0, str(HERE))
    for gguf in (HERE / "base").glob("*.gguf"):
        os.environ.setdefault("FIKA_SMOLLM2_GGUF", str(gguf))

import gradio as gr  # noqa: E402
import yaml  # noqa: E402

from fika.adapters import check_served  # noqa: E402
from fika.errors import FikaError, first_line  # noqa: E402
from fika.model import END_OF_TURN, load_base_model, load_tokenizer, template_kind  # noqa: E402

DEFAULT_SYSTEM = "You are FIKA Assistant, a helpful, concise assistant."
MAX_INPUT_CHARS = int(os.environ.get("FIKA_MAX_INPUT_CHARS", "4000"))
HISTORY_TOKENS = int(os.environ.get("FIKA_HISTORY_TOKENS", "1024"))
BASE, TUNED, OTHER = "base model", "tuned adapter", "compare adapter"


def setting(name: str, env: str) -> str | None:
    """A FIKA_* environment variable, else the exported Space's space.yaml (paths relative to this file)."""
    path = HERE / "space.yaml"
    saved = yaml.safe_load(path.read_text()) if path.exists() else {}
    value = os.environ.get(env) or (saved or {}).get(name)
    return str(HERE / value) if value and (HERE / value).exists() else value


class Assistant:
    """One base model with up to two LoRA adapters on it, and the tokenizer they were trained with."""

    def __init__(self, base: str | None, adapter: str | None, compare: str | None, trust_remote_code: bool = False):
        self.warnings: list[str] = []
        adapters = {TUNED: adapter, OTHER: compare}
        config = check_served(base, adapter, compare, trust_remote_code)
        self.model_name = config.name
        self.tokenizer = load_tokenizer(config)
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN[template_kind(self.tokenizer, config)])
        self.model = load_base_model(config, self.tokenizer, quantize=False).eval()
        self.model.config.use_cache = True
        self.choices = [BASE]
        for label, path in adapters.items():
            if path is None:
                continue
            try:
                self.model = self.attach(label, path)
            except Exception as err:  # a broken adapter is refused: serving the base instead would mislead
                raise FikaError(
                    f"the {label} {path} cannot be loaded on {self.model_name}: {first_line(err, 200)}"
                ) from None
            self.choices.append(label)
        self.lock = threading.Lock()  # one generation at a time: the active adapter is model state

    def longest_message(self) -> int:
        """Tokens a single accepted message may take (at about 4 characters per token, generously)."""
        return MAX_INPUT_CHARS // 2

    def attach(self, label: str, path: str):
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=label)
            return self.model
        return PeftModel.from_pretrained(self.model, path, adapter_name=label)

    def stream(self, messages: list[dict], which: str, max_new_tokens: int, temperature: float, top_p: float):
        """Yields the reply as it grows, token by token."""
        from transformers import TextIteratorStreamer

        window = getattr(self.model.config, "max_position_embeddings", 2048) - max_new_tokens
        inputs = fit_history(self.tokenizer, messages, min(window, HISTORY_TOKENS + self.longest_message()))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        kwargs = dict(
            **inputs,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            eos_token_id=self.end_of_turn,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        from peft import PeftModel

        with self.lock:
            context = contextlib.nullcontext()
            if isinstance(self.model, PeftModel):
                if which == BASE:
                    context = self.model.disable_adapter()
                else:
                    self.model.set_adapter(which)
            with context:
                worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
                worker.start()
                try:
                    reply = ""
                    for piece in streamer:
                        reply += piece
                        yield reply
                finally:  # also when the user leaves mid-reply: the next request waits for this one
                    worker.join()


def text_of(content) -> str:
    """Gradio 6 message content may be a string or a list of blocks; the chat template needs a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text_of(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def conversation(message: str, history: list[dict], system: str) -> list[dict]:
    """The messages sent to the model: the system prompt, the accepted turns of the history, the new message.

    A user turn that would be refused now (empty, too long), and the reply that followed it, are left out.
    """
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    skip_reply = False
    for turn in history or []:
        role, text = turn.get("role"), text_of(turn.get("content"))
        if role == "user":
            skip_reply = check_message(text) is not None
            if not skip_reply:
                messages.append({"role": "user", "content": text})
        elif role == "assistant" and not skip_reply and text:
            messages.append({"role": "assistant", "content": text})
    return [*messages, {"role": "user", "content": message}]


def fit_history(tokenizer, messages: list[dict], budget: int) -> dict:
    """The tokenized prompt, oldest user/assistant turns dropped first until it fits `budget` tokens."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        inputs = tokenizer.apply_chat_template(
            system + turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        if inputs["input_ids"].shape[1] <= budget or len(turns) <= 1:
            return {k: v[:, -budget:] for k, v in inputs.items()}
        turns = turns[2:] if len(turns) > 2 else turns[-1:]


def check_message(message) -> str | None:
    """A reason to refuse a message, or None."""
    text = text_of(message).strip()
    if not text:
        return "Please type a message."
    if len(text) > MAX_INPUT_CHARS:
        return f"Your message is {len(text):,} characters long; the limit is {MAX_INPUT_CHARS:,}. Please shorten it."
    return None


def validate_message(message, *_):
    """Gradio's check before a message is added to the chat: refused messages stay out of the history."""
    problem = check_message(message)
    return gr.validate(problem is None, problem or "")


def leaderboard(report: str | None):
    """The ranked table (top rows), the best config and the loss curves of a search report, if configured."""
    if not report or not (Path(report) / "trials.csv").exists():
        return None
    import pandas as pd

    table = pd.read_csv(Path(report) / "trials.csv")
    params = [c for c in table.columns if c.startswith("param:")]
    # the train loss where every ranked trial compares (the rung a pruned trial stopped at); else its last
    train, name = "train_loss_smooth", "train loss avg10"
    if "train_loss_at_shared_step" in table.columns and len(table):
        train, name = "train_loss_at_shared_step", f"train loss avg10 @{table['shared_step'].iloc[0]}"
    table = table[
        ["rank", "trial", *params, "status", "eval_loss", train, "steps", "tokens_seen", "wall_time_s"]
    ].round({"eval_loss": 4, train: 4, "wall_time_s": 0})
    short = {c: ", ".join(part.split(".")[-1] for part in c.removeprefix("param:").split(",")) for c in params}
    table = table.rename(
        columns={**short, train: name, "eval_loss": "eval loss", "tokens_seen": "tokens", "wall_time_s": "wall s"}
    )
    best = (Path(report) / "best.yaml").read_text() if (Path(report) / "best.yaml").exists() else ""
    curves = Path(report) / "curves.png"
    return table, best, str(curves) if curves.exists() else None


def build_app(
    base: str | None = None,
    adapter: str | None = None,
    compare: str | None = None,
    report: str | None = None,
    base_only: bool = False,
    trust_remote_code: bool = False,
) -> gr.Blocks:
    """The Gradio app; arguments default to the FIKA_* environment variables, then to the exported space.yaml.

    Without an adapter it refuses to start unless `base_only` (a mistyped path must not serve the wrong model).
    """
    adapter = None if base_only else adapter or setting("adapter", "FIKA_ADAPTER")
    compare = compare or setting("compare", "FIKA_COMPARE_ADAPTER")
    report = report or setting("report", "FIKA_REPORT")
    if report and not (Path(report) / "trials.csv").exists():
        raise FikaError(f"--report: {report} is not a search report folder (no trials.csv)")
    if adapter is None and not base_only:
        raise FikaError("--adapter: no adapter given; give an adapter folder from `fika train`, or --base-only")
    assistant = Assistant(base or setting("base", "FIKA_BASE_MODEL"), adapter, compare, trust_remote_code)
    for warning in assistant.warnings:
        print(f"FIKA Assistant: {warning}", file=sys.stderr)

    title = "FIKA Assistant"
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nBase model `{assistant.model_name}`; serving: {', '.join(assistant.choices)}.")
        for warning in assistant.warnings:
            gr.Markdown(f"**Note:** {warning}")
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2)
            with gr.Row():
                max_new_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p")
        settings = [system, max_new_tokens, temperature, top_p]
        with gr.Tab("Chat"):
            chat_tab(assistant, settings)
        with gr.Tab("Compare"):
            compare_tab(assistant, settings)
        with gr.Tab("Leaderboard"):
            leaderboard_tab(report)
    app.queue(default_concurrency_limit=1, max_size=64)
    return app


def default_choice(assistant: Assistant) -> str:
    return TUNED if TUNED in assistant.choices else BASE


def chat_tab(assistant: Assistant, settings: list) -> None:
    """The Chat tab: a streamed conversation with the chosen model."""

    def chat(message, history, model, system, max_new_tokens, temperature, top_p):
        problem = check_message(message)
        if problem:
            yield problem
            return
        messages = conversation(text_of(message).strip(), history, system)
        yield from assistant.stream(messages, model, int(max_new_tokens), float(temperature), float(top_p))

    model = gr.Radio(assistant.choices, value=default_choice(assistant), label="Model")
    gr.ChatInterface(
        chat,
        additional_inputs=[model, *settings],
        chatbot=gr.Chatbot(height=420, label="FIKA Assistant"),
        textbox=gr.Textbox(placeholder="Ask anything...", max_lines=8, submit_btn=True),
        api_name="chat",
        validator=validate_message,  # a refused message never enters the history
    )


def compare_tab(assistant: Assistant, settings: list) -> None:
    """The Compare tab: one message, two models' replies side by side."""

    def compare_models(message, model_a, model_b, system, max_new_tokens, temperature, top_p):
        problem = check_message(message)
        if problem:
            yield problem, problem
            return
        messages = conversation(text_of(message).strip(), [], system)
        reply_a = ""
        for reply_a in assistant.stream(messages, model_a, int(max_new_tokens), float(temperature), float(top_p)):
            yield reply_a, ""
        for reply_b in assistant.stream(messages, model_b, int(max_new_tokens), float(temperature), float(top_p)):
            yield reply_a, reply_b

    gr.Markdown("One message, two models side by side: what did the search buy?")
    with gr.Row():
        model_a = gr.Dropdown(assistant.choices, value=BASE, label="Model A")
        model_b = gr.Dropdown(assistant.choices, value=default_choice(assistant), label="Model B")
    prompt = gr.Textbox(label="Message", placeholder="Ask both models...", lines=2)
    run = gr.Button("Compare", variant="primary")
    with gr.Row():
        out_a = gr.Textbox(label="Model A", lines=12)
        out_b = gr.Textbox(label="Model B", lines=12)
    inputs = [prompt, model_a, model_b, *settings]
    run.click(compare_models, inputs, [out_a, out_b], api_name="compare")
    prompt.submit(compare_models, inputs, [out_a, out_b], api_name=False)


def leaderboard_tab(report: str | None) -> None:
    """The Leaderboard tab: a search report's ranked table, loss curves and best config."""
    board = leaderboard(report)
    if board is None:
        gr.Markdown(
            "No search report configured: set FIKA_REPORT to a `reports/<name>` folder (written by `fika search`)."
        )
        return
    table, best, curves = board
    gr.Markdown(f"Ranked trials of `{Path(report).name}` (eval loss at the last step; lower is better).")
    gr.Dataframe(table, interactive=False, wrap=True)
    if curves:
        gr.Image(curves, label="Loss curves of the top trials", interactive=False)
    if best:
        with gr.Accordion("best.yaml: the best trial's config (`fika train --config best.yaml`)", open=False):
            gr.Code(best, language="yaml", max_lines=60)


if __name__ == "__main__":
    try:
        app = build_app(base_only=os.environ.get("FIKA_BASE_ONLY") == "1")
    except FikaError as err:
        sys.exit(f"FIKA Assistant: {err}")
    app.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
