"""Packed trials on Ray: an actor per GPU (or per CPU set of a node) holds a `fika.pack.Pack`; Tune trials join it.

In a search with `resources.pack` K > 1, a Tune trial is a relay: `FikaTrainable` reserves its share of a pack's
resources (cpu / K, gpu / K: K relays fit on a GPU), joins a pack on its node and device with `run_in_pack`, and hands
Tune its member's records as a solo trial hands its own. So Optuna, ASHA, the report and `--resume` see one Tune
trial per configuration, as in a solo search. A pack trains its members in the same micro-steps; a member that
reaches a hold step (an ASHA rung, or the step a pruned trial stopped at before a kill) is held, trains nothing,
while the others go on, until its relay says go on (`release`) or stop (`stop`: it leaves as `stopped`, its files
written, and a waiting trial takes its place).

Who owns what: the driver starts one `PackDirectory` per fit (`start_packs`); it creates the packs as relays ask
for them (`PackServer`, on the relay's node, with the relay's GPU), so a pack ends with the directory, and the
directory with the driver: a killed driver leaves no pack training behind. A pack takes no Ray resources of its
own (its members' relays hold them), and runs its micro-steps in a thread; its methods are called concurrently.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import uuid
from collections.abc import Callable

import ray

from fika.config import TrialConfig
from fika.errors import error_text
from fika.observe import TrialHooks
from fika.result import TrialResult

NEXT_WAIT_S = 0.5  # how long a relay's `next` call waits for a record before it looks whether it must stop
_DIRECTORIES: list = []  # the directories this driver started (ended by `end_packs`)


@ray.remote(num_cpus=0)
class PackDirectory:
    """The packs of one fit, by node and device; creates them as relays ask, and owns them."""

    def __init__(self, spec: dict, cwd: str | None, capacity: int) -> None:
        self.spec, self.cwd, self.capacity = spec, cwd, capacity
        self.packs: dict[tuple[str, str], list] = {}

    def packs_on(self, node: str, device: str, known: int = -1) -> list:
        """The live packs of `node` and `device`; when there are `known` of them (all found full), one more is
        created."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        packs = self.packs.setdefault((node, device), [])
        for pack in [pack for pack in packs if not alive(pack)]:  # its trials failed, and are retried in another
            packs.remove(pack)
            ray.kill(pack)
        if len(packs) == known:
            env = {} if device == "cpu" else {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": device}}}
            where = NodeAffinitySchedulingStrategy(node, soft=False)
            packs.append(
                PackServer.options(scheduling_strategy=where, max_concurrency=4 * self.capacity + 8, **env).remote(
                    self.spec, self.cwd, self.capacity
                )
            )
        return packs


@ray.remote(num_cpus=0)
class PackServer:
    """One base model and the trials training on it (at most `capacity`), stepped in a thread of this actor."""

    def __init__(self, spec: dict, cwd: str | None, capacity: int) -> None:
        import torch

        from fika.model import hide_libraries
        from fika.search.spec import SearchSpec
        from fika.search.trainable import unused_libraries

        self.spec = SearchSpec.model_validate(spec)
        if cwd and os.path.isdir(cwd):  # relative data paths mean what they meant to the driver
            os.chdir(cwd)
        hide_libraries(unused_libraries(self.spec))
        torch.set_num_threads(max(1, math.floor(self.spec.resources.cpu)))
        os.environ["FIKA_DATA_WORKERS"] = str(max(1, math.floor(self.spec.resources.cpu)))
        self.capacity = capacity
        self.pack = None
        self.turn = threading.Condition()  # held while the pack changes: a micro-step, a join, a release, a stop
        self.records: dict[str, queue.Queue] = {}
        self.hold_at: dict[str, set[int]] = {}
        self.failure: str | None = None
        threading.Thread(target=self.train, daemon=True).start()

    def join(self, config: str, hold_at: list[int], quick_evals) -> str | None:
        """Adds a trial (its TrialConfig as JSON) at the next micro-step; returns its key, or None when the pack is
        full."""
        from fika.pack import Pack

        trial = TrialConfig.model_validate_json(config)
        with self.turn:
            if self.failure is not None:
                raise RuntimeError(f"the pack cannot train: {self.failure}")
            members = self.pack.members if self.pack is not None else {}
            if len(members) >= self.capacity:
                return None
            if self.pack is None:
                from fika.model import device_kind

                checkpointing = trial.train.gradient_checkpointing and device_kind() == "cuda"
                self.pack = Pack(trial.model, activation_checkpointing=checkpointing)
            cell: list[str] = []
            hooks = TrialHooks(report=lambda record: self.reported(cell[0], record), quick_evals=quick_evals)
            key = self.pack.add(trial, hooks)
            cell.append(key)
            self.records[key], self.hold_at[key] = queue.Queue(), set(hold_at)
            self.turn.notify_all()
            return key

    def evict(self, folder: str) -> None:
        """A member training into `folder` leaves (as interrupted): its relay died, and Tune runs the trial again (it
        never runs two copies of a trial at once)."""
        with self.turn:
            members = self.pack.members if self.pack is not None else {}
            for key, member in list(members.items()):
                if str(member.out.resolve()) == os.path.realpath(folder):
                    self.stop_member(key, "interrupted")

    def reported(self, key: str, record: dict) -> bool:
        """A member's logged step (in the training thread): queued for its relay, and held there at a hold step."""
        self.records[key].put(("record", record))
        if record["step"] in self.hold_at[key]:
            self.pack.hold(key)
        return False

    def next(self, key: str) -> tuple[str, object] | None:
        """The member's next record (`("record", dict)`) or its end (`("done", TrialResult)`); None after a wait."""
        try:
            item = self.records[key].get(timeout=NEXT_WAIT_S)
        except queue.Empty:
            return None
        if item[0] == "done":
            self.records.pop(key, None)
            self.hold_at.pop(key, None)
        return item

    def release(self, key: str) -> None:
        """A held member trains again."""
        with self.turn:
            self.pack.release(key)
            self.turn.notify_all()

    def stop(self, key: str, status: str) -> None:
        """The member leaves now (its files written, `status`: stopped or interrupted); its end is queued."""
        with self.turn:
            self.stop_member(key, status)

    def stop_member(self, key: str, status: str) -> None:
        if self.pack is not None and key in self.pack.members:
            self.records[key].put(("done", self.pack.remove(key, status)))
            self.turn.notify_all()

    def members(self) -> int:
        """How many trials the pack trains; raises once the pack itself failed (its directory then replaces it)."""
        if self.failure is not None:
            raise RuntimeError(f"the pack cannot train: {self.failure}")
        return len(self.pack.members) if self.pack is not None else 0

    def train(self) -> None:
        """The training thread: one micro-step after another while a member is not held; each ended member's result
        goes to its relay. An error of the pack itself (not of one member) ends every member as failed."""
        while True:
            with self.turn:
                self.turn.wait_for(self.ready, timeout=1.0)
                if not self.ready():
                    continue
                keys = {id(m.trial.result): key for key, m in self.pack.members.items()}
                try:
                    ended = self.pack.step()
                except Exception as err:
                    self.failure = error_text(err)
                    ended = [self.pack.leave(m, "failed", self.failure) for m in list(self.pack.members.values())]
                for result in ended:
                    self.records[keys[id(result)]].put(("done", result))

    def ready(self) -> bool:
        return self.pack is not None and any(key not in self.pack.held for key in self.pack.members)


def alive(pack) -> bool:
    """Whether a pack actor still answers and can train (one busy loading its base model counts as alive)."""
    try:
        ray.get(pack.members.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
        return False
    except ray.exceptions.GetTimeoutError:
        pass
    return True


def start_packs(spec, capacity: int, cwd: str | None) -> str:
    """Starts the directory of this fit's packs (owned by this driver); returns its name, which relays look up."""
    name = f"fika-packs-{uuid.uuid4().hex[:12]}"
    _DIRECTORIES.append(PackDirectory.options(name=name).remote(spec.model_dump(mode="json"), cwd, capacity))
    return name


def end_packs() -> None:
    """Ends the packs this driver started (their members' relays have ended with the fit)."""
    while _DIRECTORIES:
        ray.kill(_DIRECTORIES.pop())


def join_pack(directory: str, config: TrialConfig, hold_at: list[int], quick_evals) -> tuple:
    """Joins a pack with room on this relay's node and device (creating one when all are full); returns the pack and
    the member's key."""
    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU", [])
    device = str(gpus[0]) if gpus else "cpu"
    packs_of, node = ray.get_actor(directory).packs_on, context.get_node_id()
    packs = ray.get(packs_of.remote(node, device))
    ray.get([pack.evict.remote(config.output.dir) for pack in packs])  # a copy of this trial whose relay died
    trial = config.model_dump_json()
    while True:
        for pack in packs:
            key = ray.get(pack.join.remote(trial, hold_at, quick_evals))
            if key is not None:
                return pack, key
        packs = ray.get(packs_of.remote(node, device, len(packs)))


def run_in_pack(
    directory: str, config: TrialConfig, hooks: TrialHooks, hold_at: list[int], stopping: Callable[[], bool]
) -> TrialResult:
    """Runs one trial as a member of a pack (see the module docstring): `hooks.report` gets each record (a True
    return stops it), `stopping()` is asked while no record comes; returns its result as `run_trial` does, and
    raises for a member that failed."""
    pack, key = join_pack(directory, config, hold_at, hooks.quick_evals)
    leaving = False

    def leave() -> None:
        nonlocal leaving
        leaving = True
        ray.get(pack.stop.remote(key, "interrupted" if hooks.interrupted and hooks.interrupted() else "stopped"))

    while True:
        item = ray.get(pack.next.remote(key))
        if item is not None and item[0] == "done":
            return ended(item[1])
        if item is None or leaving:  # no record yet, or one queued after a stop (dropped: the run ended there)
            if not leaving and stopping():
                leave()
            continue
        record = item[1]
        if hooks.report(record):
            leave()
        elif record["step"] in hold_at:
            ray.get(pack.release.remote(key))


def ended(result: TrialResult) -> TrialResult:
    """A member's result, as `run_trial` ends: a failed run raises its error."""
    if result.status == "failed":
        raise RuntimeError(result.error or "the packed trial failed")
    return result
