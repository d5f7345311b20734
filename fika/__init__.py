"""fika: LoRA hyperparameter search for chat LLMs. This package runs ONE trial from a validated config (no Ray);
`fika.search` runs many, `fika.spaces` serves the result.

    import fika
    result = fika.train(overrides={"lora.r": 32})          # one run; result.status, .eval_loss, .adapter_dir
    mix = fika.data_mix(overrides=["data.sources.0.limit=500"])
    search = fika.search.run("demo")                        # a search: search.ranking is a pandas DataFrame
"""

from fika.api import data_mix, train
from fika.errors import FikaError

__version__ = "0.1.0"
__all__ = ["FikaError", "data_mix", "train"]


def __getattr__(name: str):
    if name == "search":  # `fika.search` without an import of its own (it imports Ray when it runs)
        import importlib

        return importlib.import_module("fika.search")
    raise AttributeError(f"module 'fika' has no attribute {name!r}")
