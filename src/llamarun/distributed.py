"""Several processes, one model: torchrun's environment, the process groups, and how rank 0
drives the other ranks.

Rank 0 owns the engine (sampling, the CLI's text, chat input, the HTTP server). Before each
forward it broadcasts the batch (tokens, positions, cache rows) on a gloo "control" group; every
other rank runs the same forward on its share of the model (tp.py's all-reduces, pp.py's
activations) and waits for the next one. The compute group uses NCCL on CUDA, gloo on CPU.

Failure: every collective turns a broken connection into DistributedError. Errors are printed
once, by rank 0; another rank records its own error in the job's store for rank 0 to print, and
speaks itself only when rank 0 is gone. A killed process closes its sockets, so its peers fail
at once rather than waiting for a timeout. One process on one device never imports this module.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import ConfigError, DistributedError, LlamarunError
from .split import Split

# Ranks other than 0 wait for the next batch for as long as rank 0 lives (a server may idle for
# days; a dead rank 0 closes its sockets, which ends the wait at once).
CONTROL_TIMEOUT = timedelta(days=30)
# A collective of a forward: its peers run the same step, so waiting longer means a rank hangs.
COMPUTE_TIMEOUT = timedelta(minutes=5)
GRACE_S = 3.0  # how long a rank that lost contact gives rank 0 to report before it speaks
CONTROL_WORDS = 64  # int64 words of a command; a decode step's batch fits inline
FORWARD, STOP = 1, 2
_DONE, _REPORTER = "llamarun/rank0-done", "llamarun/reporter"


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this machine (they share its RAM)


def read_launch(env: dict[str, str] | None = None) -> Launch | None:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), read here and
    nowhere else; None outside a torchrun job."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError as e:
        raise ConfigError(
            f"torchrun's environment is malformed ({e}); start the job with torchrun"
        ) from e
    return Launch(rank, world_size, local_rank, local_world_size)


def launch_rank() -> int:
    """This process's rank (0 outside a torchrun job)."""
    launch = read_launch()
    return launch.rank if launch is not None else 0


def check_launch(split: Split, device: torch.device) -> Launch:
    """The torchrun job must have exactly tp x pp processes; say how to start one otherwise."""
    launch = read_launch()
    have = launch.world_size if launch is not None else 1
    if have != split.world_size:
        n = split.world_size
        argv = sys.argv[1:] if Path(sys.argv[0]).name in ("llamarun", "__main__.py") else None
        example = f"torchrun --nproc-per-node {n} -m llamarun " + (
            " ".join(argv) if argv else f"COMMAND MODEL {split.flags()}"
        )
        raise ConfigError(
            f"{split.flags()} needs {n} processes but WORLD_SIZE is {have}. Run with: {example}"
            + (" (on several machines, see docs/distributed.md)" if launch is None else "")
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"{split.flags()} runs on CPUs (gloo) or CUDA GPUs (NCCL), not {device.type}"
        )
    if device.type == "cuda" and device.index is not None:
        raise ConfigError(
            f"with {split.flags()} each rank takes the GPU of its LOCAL_RANK: pass --device cuda, not {device}"
        )
    return launch


class World:
    """This process's place in the job: its rank and stage, its groups, the job's store, and
    rank 0's driver while one is open."""

    def __init__(self, launch: Launch, split: Split, device: torch.device):
        self.rank, self.launch, self.device = launch.rank, launch, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.store, rank, world_size = next(dist.rendezvous("env://", timeout=COMPUTE_TIMEOUT))
        dist.init_process_group(
            backend, store=self.store, rank=rank, world_size=world_size, timeout=COMPUTE_TIMEOUT
        )
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.driver: Driver | None = None
        self.broken: BaseException | None = None
        self.use_split(split)

    def use_split(self, split: Split) -> None:
        """Place this rank in `split` (every rank calls it, in the same order: new groups are
        made by all ranks together)."""
        self.split = split
        self.stage, self.tp_rank = split.stage_of(self.rank), split.tp_rank_of(self.rank)
        self.tp_group = None  # the whole world when there is one stage
        for stage in range(split.pp if split.tp > 1 and split.pp > 1 else 0):
            group = dist.new_group([split.rank_at(stage, i) for i in range(split.tp)])
            if stage == self.stage:
                self.tp_group = group

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def stage_rank(self, stage: int) -> int:
        """The rank of `stage` with this rank's tensor-parallel position."""
        return self.split.rank_at(stage, self.tp_rank)

    # ---- messages between ranks ----

    def barrier(self) -> None:
        guarded("waiting for the other ranks", dist.barrier, group=self.control)

    def record_error(self, error: BaseException) -> bool:
        """Leave this rank's error for rank 0 to print; False when the store is unreachable."""
        try:
            self.store.set(f"llamarun/error/{self.rank}", _one_line(error))
            return True
        except (RuntimeError, dist.DistError):
            return False

    def recorded_errors(self) -> list[str]:
        found = []
        for rank in range(1, self.split.world_size):
            key = f"llamarun/error/{rank}"
            try:
                if self.store.check([key]):
                    found.append(f"rank {rank} failed: {self.store.get(key).decode()}")
            except (RuntimeError, dist.DistError):
                break
        return found

    def rank0_reported(self) -> bool:
        """Whether rank 0 ended in a way that lets it speak (it marks the store as it exits)."""
        try:
            self.store.wait([_DONE], timedelta(seconds=GRACE_S))
            return True
        except (RuntimeError, dist.DistError):  # timed out, or rank 0 hosted the store and died
            return False

    def elected_to_report(self) -> bool:
        """Only one of the ranks that outlived rank 0 prints the error."""
        try:
            return self.store.add(_REPORTER, 1) == 1
        except (RuntimeError, dist.DistError):
            return True

    def shutdown(self) -> None:
        """At exit: rank 0 releases the others (unless a forward broke) and marks the store."""
        if self.is_driver:
            if self.driver is not None:
                self.driver.close()
            try:
                self.store.set(_DONE, "1")
            except (RuntimeError, dist.DistError):
                pass
        if self.broken is None and dist.is_initialized():
            dist.destroy_process_group()


_world: World | None = None


def init_world(split: Split, device: torch.device) -> World:
    """Join the torchrun job (once per process; later loads with the same split reuse it)."""
    global _world
    launch = check_launch(split, device)
    if _world is not None:  # a later load in the same job
        if _world.device.type != device.type:
            raise ConfigError(
                f"this torchrun job already runs on {_world.device.type}; every model it loads runs there"
            )
        if _world.driver is not None:
            raise ConfigError(
                "close the distributed LLM loaded before (llm.close()) to load another"
            )
        if _world.split != split:
            _world.use_split(split)
        return _world
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
    _world = World(launch, split, device)
    atexit.register(_world.shutdown)
    if threading.current_thread() is threading.main_thread():
        # torchrun forwards Ctrl-C and SIGTERM to every rank: the whole job ends, so these end
        # the process (chat would take a KeyboardInterrupt as "stop this answer") and atexit
        # still releases the other ranks.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_on_signal)
    return _world


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def guarded(what: str, op: Callable, *args, **kwargs):
    """Run a collective; a broken connection or a timeout becomes one DistributedError."""
    try:
        return op(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        raise lost_contact(what, e) from e


def lost_contact(what: str, error: BaseException) -> DistributedError:
    recorded = _world.recorded_errors() if _world is not None and _world.is_driver else []
    if recorded:
        return DistributedError("; ".join(recorded))
    return DistributedError(
        f"lost contact with another rank while {what} ({_one_line(error)}): a process of this "
        "job stopped or was killed; every rank is exiting (torchrun's summary names the rank)"
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # gloo's [file.cc:123] prefix
    return text.split(". ")[0].rstrip(".")


# ---- rank 0 drives, the others follow ----

Forward = Callable[..., torch.Tensor]  # (tokens, input_pos, rows, *, all_logits) -> logits


class Driver:
    """Rank 0's forward, called as the model is: it tells the other ranks what to run, then runs
    its own share (`run`), which returns the logits."""

    def __init__(self, world: World, run: Forward):
        self.world, self.run = world, run
        self.busy = False  # a forward that did not finish leaves the others mid-collective
        self.closed = False

    def __call__(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        rows: torch.Tensor | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        if self.closed or self.world.broken is not None:
            raise DistributedError(
                f"this distributed model can no longer run ({self.world.broken or 'it was closed'}); start the job again"
            )
        self.busy = True
        try:
            _broadcast_command(self.world, encode(FORWARD, tokens, input_pos, rows, all_logits))
            logits = self.run(tokens, input_pos, rows, all_logits=all_logits)
        except BaseException as e:
            self.world.broken = e
            raise
        self.busy = False
        return logits

    def close(self) -> None:
        """Let the other ranks' load() return (unless a forward broke: they are failing too)."""
        if self.closed:
            return
        self.closed = True
        if not self.busy and self.world.broken is None:
            _broadcast_command(self.world, torch.tensor([STOP] + [0] * (CONTROL_WORDS - 1)))
        self.world.driver = None


def encode(
    op: int,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    rows: torch.Tensor | None,
    all_logits: bool,
) -> list[torch.Tensor]:
    """A command: [op, B, T, all_logits, has_rows, inline] + tokens, input_pos (and rows), inline
    when they fit CONTROL_WORDS, else as a second message."""
    B, T = tokens.shape
    parts = [tokens.reshape(-1), input_pos.reshape(-1)] + (
        [rows.reshape(-1)] if rows is not None else []
    )
    payload = torch.cat([p.to("cpu", torch.int64) for p in parts])
    inline = 6 + payload.numel() <= CONTROL_WORDS
    head = torch.tensor([op, B, T, int(all_logits), int(rows is not None), int(inline)])
    if inline:
        return [
            torch.cat(
                [head, payload, torch.zeros(CONTROL_WORDS - 6 - payload.numel(), dtype=torch.int64)]
            )
        ]
    return [torch.cat([head, torch.zeros(CONTROL_WORDS - 6, dtype=torch.int64)]), payload]


def _broadcast_command(world: World, messages: list[torch.Tensor] | torch.Tensor) -> None:
    for message in messages if isinstance(messages, list) else [messages]:
        guarded("sending the next batch", dist.broadcast, message, 0, group=world.control)


def follow(world: World, run: Forward) -> None:
    """Ranks other than 0: run each forward rank 0 announces, until it closes its model. A lost
    rank ends the process (SystemExit) after reporting it once if rank 0 cannot."""
    device = world.device
    try:
        while True:
            head = torch.empty(CONTROL_WORDS, dtype=torch.int64)
            guarded("waiting for the next batch", dist.broadcast, head, 0, group=world.control)
            op, B, T, all_logits, has_rows, inline = head[:6].tolist()
            if op == STOP:
                return
            n = 2 * B * T + (B if has_rows else 0)
            if inline:
                payload = head[6 : 6 + n]
            else:
                payload = torch.empty(n, dtype=torch.int64)
                guarded("receiving the next batch", dist.broadcast, payload, 0, group=world.control)
            payload = payload.to(device)
            tokens, input_pos = payload[: B * T].view(B, T), payload[B * T : 2 * B * T].view(B, T)
            rows = payload[2 * B * T :] if has_rows else None
            with torch.inference_mode():
                run(tokens, input_pos, rows, all_logits=bool(all_logits))
    except BaseException as e:
        world.broken = e
        follower_exit(world, e)


def follower_exit(world: World, error: BaseException) -> None:
    """How a rank other than 0 ends after `error`: quietly when rank 0 reports it (a lost rank
    rank 0 also notices; its own error it leaves in the store), aloud when rank 0 is gone."""
    if isinstance(error, SystemExit | KeyboardInterrupt):
        raise SystemExit(error.code if isinstance(error, SystemExit) else 130) from None
    if isinstance(error, DistributedError):
        if not world.rank0_reported() and world.elected_to_report():
            print(f"llamarun: error: rank {world.rank}: {error}", file=sys.stderr, flush=True)
    elif not world.record_error(error):
        print(
            f"llamarun: error: rank {world.rank}: {_one_line(error)}", file=sys.stderr, flush=True
        )
    if not isinstance(error, LlamarunError | DistributedError):
        raise error  # a bug: its traceback is worth seeing
    raise SystemExit(2) from None
