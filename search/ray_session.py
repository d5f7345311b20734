"""The Ray a search runs on: joined or started (with the environment its driver and workers need), checked to
hold a trial, told to stop on Ctrl-C or SIGTERM, and shut down."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from fika.errors import ConfigError, first_line
from fika.search.spec import SearchSpec
from fika.stopping import interruption, stop_signals_handled

# Results the driver must see at once: every step is reported, the metric only at eval steps.
DRIVER_ENV = {
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # fika prints its own progress lines
    # Save the experiment state every second (Ray's default starts at 10 s), so that after a killed driver
    # `--resume` knows nearly every trial that had started; fika settles the rest (searcher.reconcile).
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    # Ctrl-C is fika's (`stopping_gracefully`): Tune's own handler would end the fit as if it had run to its end,
    # and the search would be recorded finished with trials never run.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    # Tune's default CSV and TensorBoard loggers rewrite every trial's files at each result (TensorBoard flushes its
    # event file each time: the largest cost of a long search's driver); fika keeps each trial's metrics itself, and
    # adds Tune's JSON logger only (`tracker_callbacks`; `trackers: [tensorboard]` adds TensorBoard's).
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
# Trials work in the driver's working folder (Tune would move each into its own; a cluster's worker starts
# wherever its node's Ray runs; `FikaTrainable.setup` moves it there), so that relative data paths mean the same
# to every trial as to the driver that validated them. A local Ray's workers inherit the driver's environment; a
# cluster's get it as a runtime env (which costs each new worker a second or two).
# A trial that tokenizes (a node without the driver's data cache) keeps to its CPU share.
WORKER_ENV_VARS = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TOKENIZERS_PARALLELISM": "false"}


def local_slots(spec: SearchSpec) -> int | None:
    """How many trials a local Ray runs at once (its CPUs and GPUs over a trial's share); None on a cluster,
    which an autoscaler may grow."""
    import ray

    if spec.address is not None:
        return None
    from fika.search.plan import pack_size

    have = ray.cluster_resources()
    fits = [have.get("CPU", 0) / spec.resources.cpu]
    if spec.resources.gpu:
        fits.append(have.get("GPU", 0) / spec.resources.gpu)
    return max(1, int(min(fits) + 1e-9)) * pack_size(spec)  # a pack's trials share its resources


def check_address(address: str) -> None:
    """Fails in seconds when a HOST:PORT cluster address does not answer (ray.init would wait for minutes)."""
    if address in ("auto", "local") or address.startswith(("ray://", "anyscale://")):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"address: {address!r} is not allowed: give auto or HOST:PORT (the head's GCS port, 6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as err:
        raise ConfigError(
            f"address: {address!r} does not answer ({err.strerror or err}); is `ray start --head` running there?"
        ) from None


def connect_ray(spec: SearchSpec, address: str | None) -> bool:
    """Joins the given cluster (or an already started instance), or starts a local Ray; checks that a trial fits.

    Returns whether this call connected (the caller then shuts down what it started: `ray.shutdown()`).
    """
    import ray

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    address = address or spec.address
    connected = not ray.is_initialized()
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if connected:
        if address is None:
            os.environ.update(WORKER_ENV_VARS)
            # `local`: a Ray of this search's own, even when another one runs on this machine (Ray would join that)
            with environment(local_ray_environment(spec)):  # the raylet, and through it the workers, inherit it
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        else:
            try:
                runtime_env = {"env_vars": WORKER_ENV_VARS}
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, logging_level="ERROR")
            except ConnectionError as err:
                raise ConfigError(f"address: cannot join the Ray cluster at {address!r}: {first_line(err)}") from None
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)  # Ray's own handler dumps a stack and dies; keep the caller's
    try:
        check_trial_fits(spec, local=address is None)
    except ConfigError:
        if connected:
            ray.shutdown()
        raise
    return connected


def local_ray_environment(spec: SearchSpec) -> dict[str, str]:
    """The variables a search's local Ray starts with (its raylet, and through it its workers, inherit them).

    Ray starts one worker per CPU with itself, and Tune's trainable actors take them (`actors_in_prestarted_workers`,
    which needs the variable Tune would give them in a runtime env here). When each of those workers will run a
    trial (trials of at most one CPU, at least as many at once as the machine has CPUs: an idle one would hold
    about 400 MB) and the machine has no CUDA device, they import the trial's libraries (`fika.search.worker`,
    without the ones no trial needs) while the driver reads the data, so the first trials start without 6-8 s of
    imports in their slots. Not with CUDA: a library that asks for the GPUs at import would fix the worker's
    devices before Ray sets its trial's CUDA_VISIBLE_DEVICES.
    Ray ends a worker that has been idle for 1 s when it counts more workers than it keeps; a prestarted worker was
    ended that way ("idle for a long time") just as Tune created the first actors, which then started new processes
    (5 of 13 tries; 0 of 13 with 60 s), so the wait is 60 s here.
    """
    from fika.model import device_kind
    from fika.search.internals import tune_actor_env_vars
    from fika.search.trainable import unused_libraries

    values = {**tune_actor_env_vars(), "RAY_idle_worker_killing_time_threshold_ms": "60000"}
    at_once = min(spec.num_trials(), spec.max_concurrent or spec.num_trials())
    solo = spec.resources.pack == 1  # a packed search's workers are relays: its packs train
    if solo and spec.resources.cpu <= 1 and at_once >= (os.cpu_count() or 1) and device_kind() == "cpu":
        values.update(
            RAY_preload_python_modules="fika.search.worker", FIKA_HIDE_LIBRARIES=",".join(unused_libraries(spec))
        )
    return values


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Sets these environment variables in this process for the duration, then puts back what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_trial_fits(spec: SearchSpec, local: bool) -> None:
    """Refuses a trial that no node of the connected Ray can hold (Tune would wait for it forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.resources.gpu > gpus:
        raise ConfigError(
            f"resources.gpu: {spec.resources.gpu:g} is not allowed: the Ray cluster has {gpus:g} GPUs "
            "(set resources.gpu: 0 for CPU trials)"
        )
    cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if spec.resources.cpu > cpus:
        where = "this machine has" if local else "a trial runs on one node, and the largest of the Ray cluster has"
        raise ConfigError(f"resources.cpu: {spec.resources.cpu:g} is not allowed: {where} {cpus:g} CPUs")


@contextlib.contextmanager
def stopping_gracefully(directory: Path):
    """Around a Tune fit: the first Ctrl-C or SIGTERM has Tune save its state with every live trial and stop
    them, marked interrupted (`INTERRUPTED`: `--resume` runs them again, none is recorded failed), then raises
    KeyboardInterrupt (`fika.stopping.Terminated` for SIGTERM); a second one, or one before Tune's loop runs, raises
    at once. Off the main thread it changes nothing."""
    from fika.search.internals import tune_stop_handler
    from fika.search.trainable import INTERRUPTED

    marker = directory / INTERRUPTED
    marker.unlink(missing_ok=True)
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        tune_stop = tune_stop_handler()  # Tune's loop ends on it, after saving its state
        if received or tune_stop is None:
            raise interruption(signum)
        received.append(signum)
        marker.touch()
        tune_stop(signum, frame)

    main = threading.current_thread() is threading.main_thread()
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_DFL) if main else None  # not a handler of an earlier fit
    try:
        with stop_signals_handled(on_signal):
            yield
    except Exception as err:
        if received:  # the signal reached Ray's own processes too: the fit ended on their loss
            raise interruption(received[0]) from err
        raise
    finally:
        if main:
            signal.signal(signal.SIGUSR1, usr1)
    if received:
        raise interruption(received[0])


def end_ray(connected: bool, on_done: Callable[[], None] | None) -> None:
    """Calls `on_done()`, then shuts down the Ray connection `connect_ray` made (`connected`), if it made one."""
    if on_done is not None:
        on_done()
    if connected:
        import gc

        import ray

        # Ray ends the process when an object of a Ray that is shutting down is freed meanwhile (its core worker
        # is gone before Python knows): Tune's leftovers are collected first, and no collection runs in any
        # thread (the report's) until the shutdown is done.
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            ray.shutdown()
        finally:
            if enabled:
                gc.enable()
