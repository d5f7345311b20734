"""Runs `fika` as a driver that kills itself, with SIGKILL to its whole process group (Ray and the workers it
started included), at one chosen moment of its life: the tests' way to hit every window of a search.

    python tests/driver_killer.py PLAN fika-args...

PLAN is JSON: `{"target": "module:function" or "module:Class.method", "when": "before" | "after", "nth": N}` kills
at the N-th call of that function (before it runs, or after it returned; `"returns": "X"` counts only calls that
returned a value whose str is X, `"called_with": "Y"` only calls given an argument whose str is Y); `{"rename": "NAME", "nth": N}` kills just before the N-th rename onto a file
called NAME (an atomic write's last act: its temporary file is whole, the file itself not yet replaced). `"arm":
"module:function"` counts only what happens after that function was first called. Tracing only: fika runs as is.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys


def kill() -> None:
    sys.stdout.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def resolve(target: str):
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def wrap(target: str, on_call) -> None:
    """Replaces a function everywhere fika refers to it (its module, the modules that imported its name, a class)."""
    owner, name = resolve(target)
    original = getattr(owner, name)

    @functools.wraps(original)
    def traced(*args, **kwargs):
        return on_call(original, args, kwargs)

    setattr(owner, name, traced)
    if not isinstance(owner, type):
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is original:
                setattr(module, name, traced)


def install(plan: dict) -> None:
    armed = {"on": "arm" not in plan}
    count = {"n": 0}
    nth = plan.get("nth", 1)

    def hit() -> bool:
        if not armed["on"]:
            return False
        count["n"] += 1
        return count["n"] == nth

    if "arm" in plan:

        def arm(original, args, kwargs):
            armed["on"] = True
            return original(*args, **kwargs)

        wrap(plan["arm"], arm)
    if "rename" in plan:

        def audit(event: str, args) -> None:
            if event == "os.rename" and os.path.basename(str(args[1])) == plan["rename"] and hit():
                kill()

        sys.addaudithook(audit)
        return

    def traced(original, args, kwargs):
        if "called_with" in plan and plan["called_with"] not in map(str, [*args, *kwargs.values()]):
            return original(*args, **kwargs)
        if plan.get("when") == "before" and hit():
            kill()
        value = original(*args, **kwargs)
        if plan.get("when") == "after" and ("returns" not in plan or str(value) == plan["returns"]) and hit():
            kill()
        return value

    wrap(plan["target"], traced)


def import_fika() -> None:
    """Imports every module of fika that a driver runs (not the workers' preload), so that `wrap` finds each name
    a module imported from another."""
    import pkgutil

    import fika
    import fika.search
    import fika.search.report

    for package in (fika, fika.search, fika.search.report):
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("worker", "search", "spaces"):
                importlib.import_module(f"{package.__name__}.{info.name}")


if __name__ == "__main__":
    import_fika()
    install(json.loads(sys.argv[1]))
    from fika.cli import main

    sys.exit(main(sys.argv[2:]))
