"""Peak memory of a trial, estimated from the model's config before anything is loaded.

The parts, for one micro-batch of `batch_size x max_seq_length` tokens (the worst case: every row full):
- weights: every parameter at its load precision (fp32 on a CPU, bf16 on a GPU); in 4-bit, the decoder's
  linear layers take 0.5 byte per weight plus their quantization constants, and the rest (embeddings, norms,
  head) is kept in fp32 by k-bit preparation;
- LoRA: the adapter weights, their gradients (fp32) and the optimizer state (AdamW: 8 bytes per weight,
  8-bit AdamW: 2);
- activations: what autograd keeps per token and layer: about 22 x hidden + 4 x intermediate values (the
  inputs of the adapted layers, the norms' fp32 intermediates, rotary copies of q and k, the attention
  output, the MLP's gate, up and product), 6 x hidden + intermediate more with LoRA dropout (a dropped copy
  of each adapted layer's input), and on a CPU the attention probabilities (heads x length; CUDA kernels do
  not keep them); with gradient checkpointing only each layer's input plus one layer being recomputed;
- logits on a CPU: batch x length x vocab, in the compute dtype and again in fp32 for the loss and its gradient;
- the loss head on a GPU: trl scores the labels in tiles and never holds the whole logits; measured peaks on
  Llama-3.2 1B/3B shapes carry a part that does not grow with the batch, fitted as 10 bytes x vocab x hidden
  and counted where it exceeds what the recomputed layer (or, without checkpointing, all activations) holds;
- runtime: the CUDA context, or on a CPU the process itself (Python, torch, transformers, the tokenizer).

`bench/memory_estimate.py` compares the estimate with measured peaks (CPU and H100).
"""

from __future__ import annotations

from dataclasses import dataclass

from fika.config import TrialConfig

GIB = 2**30
CUDA_RUNTIME = 0.6 * GIB
CPU_RUNTIME = 0.55 * GIB


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # bytes per part
    device: str
    quantized: bool
    trainable_params: int
    total_params: int

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts.items() if value >= 0.005 * GIB)
        kind = "4-bit" if self.quantized else ("bf16" if self.device == "cuda" else "fp32")
        return f"{self.total / GIB:.2f} GiB on {self.device} ({kind}): {parts} GiB"


def lora_params(model, config: TrialConfig) -> int:
    """The adapter's weights: r x (in + out) for every linear layer the LoRA targets (all but the head by default)."""
    import torch

    targets = config.lora.target_modules
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            total += config.lora.r * (module.in_features + module.out_features)
    return total


def estimate_memory(config: TrialConfig, device: str, quantized: bool | None = None) -> MemoryEstimate:
    """The estimated peak memory of a trial of `config` on `device` (`cuda` or `cpu`); see the module docstring."""
    import torch

    from fika.model import empty_model

    model = empty_model(config.model)
    mc = model.config
    quantized = (
        (config.model.load_in_4bit is True or (config.model.load_in_4bit == "auto" and device == "cuda"))
        if quantized is None
        else quantized
    )
    head = model.get_output_embeddings()
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    total = sum(params.values())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    weight_bytes = 2 if device == "cuda" else 4
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # a 4-bit weight, its 8-bit block scale, and the scales' fp32 scale
    weights = linear * nf4 + (total - linear) * 4 if quantized else total * weight_bytes
    adapter = lora_params(model, config)
    optimizer_bytes = 2 if (device == "cuda" and config.train.optimizer != "adamw_torch") else 8
    hidden = mc.hidden_size
    inter = getattr(mc, "intermediate_size", 4 * hidden)
    layers = mc.num_hidden_layers
    vocab = mc.vocab_size
    tokens = config.train.batch_size * config.model.max_seq_length
    act_bytes = 2 if device == "cuda" else 4
    dropout = 6 * hidden + inter if config.lora.dropout > 0 else 0
    attention = mc.num_attention_heads * config.model.max_seq_length if device == "cpu" else 0
    per_layer = (22 * hidden + 4 * inter + dropout + attention) * act_bytes
    checkpointing = config.train.gradient_checkpointing and device == "cuda"
    # what one layer's forward holds until its backward (checkpointing: the recomputed layer; else every layer)
    transient = tokens * per_layer if checkpointing else tokens * layers * per_layer
    activations = tokens * layers * hidden * act_bytes + transient if checkpointing else transient
    if device == "cpu":
        head_name, head = "logits", tokens * vocab * (act_bytes + 8)
    else:
        head_name, head = "loss head", max(0, 10 * vocab * hidden - transient)
    parts = {
        "weights": weights,
        "adapter+grads+optimizer": adapter * (8 + optimizer_bytes),
        "activations": activations,
        head_name: head,
        "runtime": CUDA_RUNTIME if device == "cuda" else CPU_RUNTIME,
    }
    return MemoryEstimate(parts, device, quantized, adapter, total)
