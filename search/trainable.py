"""The Ray Tune trainable: one search trial = `fika.trial.run_trial` on a worker, every record forwarded.

A class trainable, so that with `reuse_actors=True` a worker keeps its process, its loaded base model and
its memory-mapped data between trials (`reset_config` gives it the next trial). The trial runs in a thread,
started by Tune's first `step()` call: Tune may create an actor for a pending trial and then run that trial
on a worker that freed up first instead, dropping the new actor, which must not have started training (it
would write into the trial's folder beside the real run). `step()` hands Tune one record at a time, and an
ASHA stop is passed back to `run_trial` through its `report` return value, so a pruned trial ends cleanly as
`stopped`, at its rung.

When the driver is asked to stop (Ctrl-C, SIGTERM), it marks the run folder (`INTERRUPTED`) before Tune saves
its state and stops the live trials: a trial stopped then ends as `interrupted`, not as `stopped` (which is an
ASHA decision), and `--resume` runs it again.

In a packed search (`resources.pack` > 1) the thread trains nothing itself: it relays its trial's member of a pack
(`fika.search.pack_server.run_in_pack`), with the same records, the same waits at the rungs and the same result.

A trial's folder is `trials/<trial id>`; a confirmation run (`fika confirm`) has its own deterministic
folder, `trials/<trial id>-seed<S>[-steps<N>]`, so that running the same confirm command again replays
what already ran instead of running it twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import socket
import threading
from pathlib import Path

import ray
from ray import tune

from fika.config import dump_config
from fika.errors import error_text
from fika.files import read_json, read_jsonl, write_atomic
from fika.observe import TrialHooks
from fika.result import TrialResult, load_result, write_failed_result
from fika.search.pack_server import run_in_pack
from fika.search.rerun import confirm_name
from fika.search.run_folder import PRUNED_AT
from fika.search.spec import SearchSpec
from fika.search.trials import split_key, trial_config
from fika.trial import run_trial

INTERRUPTED = ".interrupted"  # in the run folder while its driver stops the search (see the module docstring)


def finished_trial(directory: Path) -> tuple[dict, TrialResult] | None:
    """The last record and result of a trial that already ended in `directory` (None if it did not)."""
    result = load_result(directory)
    if result is None or result.status not in ("completed", "stopped", "diverged"):
        return None
    records = read_jsonl(directory / "metrics.jsonl")
    last = records[-1] if records else {}
    if result.eval_loss is not None:
        last["eval_loss"] = result.eval_loss
    return last, result


def unused_libraries(spec: SearchSpec) -> list[str]:
    """The optional libraries no worker of this search needs: wandb when neither the trials nor the search's
    trackers (whose wandb logger runs in Ray actors) report to it, bitsandbytes when the trials run on a CPU and none
    loads 4-bit weights (a CPU trial's 8-bit AdamW is AdamW)."""
    from fika.model import device_kind

    unused = [] if "wandb" in (*spec.base.train.report_to, *spec.trackers) else ["wandb"]
    searched = any(part == "model.load_in_4bit" for key in spec.space for part in split_key(key))
    if not searched and spec.base.model.load_in_4bit is not True and device_kind() == "cpu":
        unused.append("bitsandbytes")
    return unused


class FikaTrainable(tune.Trainable):
    """Runs one fika trial per Tune trial; see the module docstring."""

    def setup(self, config: dict, spec: dict, run_dir: str, cwd: str | None = None, packs: str | None = None) -> None:
        self.spec = SearchSpec.model_validate(spec)
        self.run_dir = Path(run_dir)
        self.packs = packs  # a packed search: the directory of its packs (fika.search.pack_server); this is a relay
        if packs is None:
            self.prepare_worker(cwd)
        self.thread: threading.Thread | None = None
        self.pending: dict | None = config  # the trial to start at the next step() call

    def prepare_worker(self, cwd: str | None) -> None:
        """Readies this process to train trials: the driver's folder, its CPU share, its GPU share."""
        import torch

        if ray.get_runtime_context().get_actor_id() is not None:  # a worker that runs only this search's trials
            if cwd and os.path.isdir(cwd):  # the driver's folder (on a node that has it): relative data paths hold
                os.chdir(cwd)
            from fika.model import hide_libraries

            hide_libraries(unused_libraries(self.spec))
            # a worker that imported torch before it was given this trial's CPUs (fika.search.worker) has one thread
            # per core; two such trials on the same cores would slow each other down several times over
            torch.set_num_threads(max(1, math.floor(self.spec.resources.cpu)))
            # a trial that must tokenize its data (a node without the driver's cache) uses its CPU share for it
            os.environ["FIKA_DATA_WORKERS"] = str(max(1, math.floor(self.spec.resources.cpu)))
        if 0 < self.spec.resources.gpu < 1 and torch.cuda.is_available():  # a shared GPU: its share, no more
            torch.cuda.set_per_process_memory_fraction(self.spec.resources.gpu)

    def _start(self, params: dict) -> None:
        confirm = json.loads(params["_confirm"]) if "_confirm" in params else None
        out = self.run_dir / "trials" / (confirm_name(confirm) if confirm else self.trial_id)
        if confirm is not None:  # a re-run of a finished trial with another seed or horizon (fika confirm)
            params = confirm["params"]
        self.out = out
        # The trial runs ahead of Tune (its records queue up) except at an ASHA rung: there it waits until Tune
        # has taken the rung's record and then asked for the next one (keep going) or stopped it. A pruned trial
        # trains no step past its rung, and a busy driver never holds a trial up between rungs.
        self.records: queue.Queue = queue.Queue()
        self.sent = self.asked = 0
        self.turn = threading.Condition()
        self.stop_requested = threading.Event()
        self.interrupted = threading.Event()
        self.last: dict = {}
        self.pruned_at: int | None = None
        self.thread = threading.Thread(target=self._run, args=(params, confirm), daemon=True)
        finished = finished_trial(out)
        if finished is not None:  # it ended before a resume (or an earlier confirm): do not run it again
            self.last, result = finished
            self.records.put_nowait(("done", result))
        else:
            (out / "result.json").unlink(missing_ok=True)  # an interrupted run's: this one replaces it
            # the scheduler's stop that the study was told of before the driver was killed: it stops there again
            self.pruned_at = (read_json(out / PRUNED_AT) or {}).get("step")
            self.thread.start()

    def _run(self, params: dict, confirm: dict | None) -> None:
        config = None
        try:
            config = trial_config(
                self.spec,
                params,
                str(self.out),
                seed=confirm and confirm["seed"],
                max_steps=confirm and confirm.get("steps"),
            )
            if confirm is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                write_atomic(self.out / "confirm.json", json.dumps(confirm))
            hooks = TrialHooks(
                report=self._report, interrupted=self.interrupted.is_set, quick_evals=self.spec.quick_evals()
            )
            if self.packs is not None:
                hold_at = sorted({*self.spec.rungs(), *([self.pruned_at] if self.pruned_at else [])})
                result = run_in_pack(self.packs, config, hooks, hold_at, stopping=self.stop_requested.is_set)
            else:
                result = run_trial(config, hooks=hooks, keep_loaded=True)
            self.records.put(("done", result))
        except BaseException as err:  # handed to step(), which raises it in Tune's thread
            try:
                if load_result(self.out) is None:  # failed before run_trial could record it
                    self.out.mkdir(parents=True, exist_ok=True)
                    if config is not None:
                        write_atomic(self.out / "config.yaml", dump_config(config))
                    write_failed_result(self.out, error_text(err))
            except OSError:  # a full disk: the error itself still reaches Tune, so no step() waits forever
                pass
            self.records.put(("error", err))

    def _report(self, record: dict) -> bool:
        self.records.put(("record", record))
        self.sent += 1
        if self.pruned_at is not None and record["step"] >= self.pruned_at:
            return True
        if record["step"] in self.spec.rungs():
            with self.turn:
                self.turn.wait_for(lambda: self.asked > self.sent or self.stop_requested.is_set())
        return self.stop_requested.is_set()

    def step(self) -> dict:
        if self.pending is not None:
            self._start(self.pending)
            self.pending = None
        with self.turn:
            self.asked += 1
            self.turn.notify_all()
        kind, item = self.records.get()
        if kind == "error":
            raise item
        if kind == "record":
            self.last = {**item, **self._where()}
            return self.last
        result = {**self.last, **self._where(), "status": item.status, "done": True}
        result.setdefault(self.spec.metric, float("nan"))  # a trial that diverged before its first eval
        return result

    def _where(self) -> dict:
        """Where this trial ran: checked by the scheduling tests and shown in reports."""
        return {
            "trial_dir": str(self.out),
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id()[:12],
            "host": socket.gethostname(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        }

    def _stop_thread(self) -> None:
        """Asks a still running trial to stop at its next step, and waits for it to end."""
        if self.thread is None:  # no trial was started on this actor
            return
        self.stop_requested.set()
        with self.turn:
            self.turn.notify_all()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # take what it hands over, so it never waits on us
                self.records.get(timeout=0.1)
        if self.thread.ident is not None:  # a replayed trial never started one
            self.thread.join()

    def reset_config(self, new_config: dict) -> bool:
        self._stop_thread()
        self.pending = new_config
        return True

    def cleanup(self) -> None:
        if self.thread is not None and (self.run_dir / INTERRUPTED).exists():  # the driver is stopping the search
            self.interrupted.set()
        self._stop_thread()

    # 60-step trials keep no checkpoints; Tune still needs these two to reuse a worker between trials.
    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        return {}

    def load_checkpoint(self, checkpoint: dict) -> None:
        pass
