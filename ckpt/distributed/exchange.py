"""How the ranks agree: ckpt's own gloo group and its gathers, where every rank reports its
part or its failure, and every rank raises when any failed.

Each step of a collective protocol (:mod:`ckpt.distributed.coordinator`,
:mod:`ckpt.distributed.restore`, the tiers) runs on every rank, catches any failure of its
own (BaseException: a KeyboardInterrupt too, as torch DCP's ``_DistWrapper`` does) and sends
it as a :class:`Failed` in the step's gather instead of its part; :func:`check_parts` then
raises on every rank at once, the failing rank its own error, the others a CheckpointError
naming it, rather than leaving them to wait at their next gather until ``CKPT_DIST_TIMEOUT``.
A SIGINT landing between those sites is deferred to the next gather
(:mod:`ckpt.distributed.interrupts`).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ckpt import config, errors
from ckpt.errors import CheckpointError

from . import interrupts

_GROUPS: dict[Any, Any] = {}


def active() -> bool:
    """Whether a call runs under an initialized default group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ckpt_group() -> Any:
    """ckpt's own gloo group over every rank (created collectively on first use, then kept)."""
    default = dist.distributed_c10d._get_default_group()
    group = _GROUPS.get(default)
    if group is None:
        timeout = timedelta(seconds=config.dist_timeout_seconds())
        group = dist.new_group(backend="gloo", timeout=timeout)
        _GROUPS[default] = group
    return group


class Failed:
    """What a rank sends instead of its part when it failed."""

    #: whether every rank ends its protocol at the gather that carries it (:func:`check_parts`)
    ends = True

    def __init__(self, rank: int, exc: BaseException) -> None:
        self.rank = rank
        self.message = f"{type(exc).__name__}: {exc}"[:2000]
        #: the ckpt error class the other ranks raise: the failing rank's own (a wrong key is an
        #: EncryptionError, a live object that does not fit a StateMismatchError on every rank),
        #: CheckpointError for anything else
        self.kind = type(exc).__name__ if _ckpt_error(type(exc)) else CheckpointError.__name__


def _ckpt_error(cls: type) -> bool:
    return issubclass(cls, CheckpointError) and getattr(errors, cls.__name__, None) is cls


class _Gather:
    """One gather of a protocol, as this rank ran it: what the protocol's end needs to tell
    whether this rank, leaving it here (a second Ctrl-C), left the other ranks in it."""

    def __init__(self, group: Any, what: str, size: int, *, last: bool) -> None:
        self.group, self.what, self.last = group, what, last
        self.out: list[Any] = [None] * size
        self.failed: list[BaseException] = []
        self.done = threading.Event()

    def run(self, value: Any) -> None:
        """The collective (on the thread that runs it)."""
        try:
            dist.all_gather_object(self.out, value, group=self.group)
        except Exception as exc:  # noqa: BLE001 - gloo reports peers gone as RuntimeError/DistBackendError
            self.failed.append(exc)
        finally:
            self.done.set()

    def left(self) -> None:
        """This rank left its protocol after (or during) this gather: the group's next gather
        waits for it, and looks at what it gathered (:func:`_check_left`)."""
        with _left_lock:
            _left.setdefault(self.group, self)

    def ended_protocol(self) -> bool:
        """Whether every rank ended the protocol at this gather: its last, or one that gathered
        a failure every rank raises at (:func:`check_parts`), or one that failed."""
        return self.last or bool(self.failed) or any((f := _failure(p)) is not None and f.ends for p in self.out)


#: per group, the gather of a protocol this rank left (a second Ctrl-C)
_left: dict[Any, _Gather] = {}
_left_lock = threading.Lock()


def _check_left(group: Any, what: str) -> None:
    """Before a gather on ``group``: wait for a gather this rank left running, then refuse
    when the other ranks went on with the protocol this rank left (its exchanges are out of
    step with theirs: the next would meet another of their collectives)."""
    with _left_lock:
        left = _left.get(group)
    if left is None:
        return
    left.done.wait()
    if left.ended_protocol():
        with _left_lock:
            if _left.get(group) is left:
                del _left[group]
        return
    raise CheckpointError(
        f"{what}: not started: this rank left the {left.what} in the middle (a second Ctrl-C) "
        "while the other ranks went on with it; ckpt's exchanges on this rank are out of step "
        "with theirs from then on: restart the job"
    )


def gather_all(
    group: Any, value: Any, what: str, mine: BaseException | None = None, *, report: bool = True, last: bool = False
) -> list[Any]:
    """All-gather ``value``; a failed collective (a dead rank, a timeout) is a CheckpointError.

    ``mine``: this rank's failure, whose report ``value`` is; a failed gather then re-raises
    a KeyboardInterrupt or SystemExit ``mine``. With ``report``, a SIGINT this rank's protocol
    deferred (:mod:`ckpt.distributed.interrupts`) is sent as its failure instead of ``value``:
    every caller of such a gather checks the parts (:func:`check_parts`). ``last``: the
    protocol ends at this gather on every rank.

    On the main thread the gather runs on a thread of its own and the main thread waits for
    it: the gather waits for the slowest rank, the gloo wait cannot be interrupted, and a
    second Ctrl-C must end that wait at once. The next gather on the group then waits for the
    one left running, and raises if the other ranks went on with the protocol this rank left
    (:func:`_check_left`): nothing is sent that would meet the wrong collective."""
    _check_left(group, what)
    rank = dist.get_rank(group)
    if mine is None and report and (deferred := interrupts.report()) is not None:
        mine, value = deferred, Failed(rank, deferred)
    interrupt = mine if mine is not None and not isinstance(mine, Exception) else None
    if interrupt is not None:
        interrupts.stopping()
    record = _Gather(group, what, dist.get_world_size(group), last=last)
    interrupts.gathered(record)
    try:
        return _gather(record, value)
    except CheckpointError:
        if interrupt is not None:
            raise interrupt from None
        raise


def _gather(record: _Gather, value: Any) -> list[Any]:
    """:func:`gather_all`'s collective, into ``record``."""
    if threading.current_thread() is threading.main_thread():  # where a signal can land
        threading.Thread(target=record.run, args=(value,), name="ckpt-gather", daemon=True).start()
        try:
            record.done.wait()  # Thread.join would be left broken by a KeyboardInterrupt (Python 3.11)
        except BaseException:
            record.left()  # still running: the group's next gather waits for it
            raise
    else:
        record.run(value)
    if record.failed:
        exc = record.failed[0]
        raise CheckpointError(f"{record.what}: the other ranks did not answer ({type(exc).__name__}: {exc})") from None
    return record.out


def entering(group: Any, what: str) -> None:
    """A protocol ``what`` starts on this thread, its first gather on ``group``: left before
    that gather (a second Ctrl-C), this rank still sends the others its failure there
    (:func:`left_before_gathering`)."""
    interrupts.entering(lambda exc: left_before_gathering(group, what, exc))


def left_before_gathering(group: Any, what: str, exc: BaseException) -> None:
    """This rank left ``what`` (a second Ctrl-C) before its first gather on ``group``, where the
    other ranks wait for it: its failure still goes to them, from a thread, as that gather
    (every such first gather checks the parts: they raise there); the group's next gather
    waits for it (:func:`_check_left`: a failure gathered, the ranks are in step)."""
    record = _Gather(group, what, dist.get_world_size(group), last=False)
    failure = Failed(dist.get_rank(group), exc)
    threading.Thread(target=record.run, args=(failure,), name="ckpt-gather", daemon=True).start()
    record.left()


def same_step(step: int, parts: list[tuple[int, Any]], what: str) -> list[Any]:
    """The parts of ``(step, part)`` pairs every rank gathered, once they all are for ``step``:
    a rank that missed a save (interrupted before it staged, say) would otherwise have its
    next step's values committed under this one, silently. Raised on every rank, before
    anything is written."""
    steps = [s for s, _ in parts]
    if any(s != step for s in steps):
        ranks = ", ".join(f"rank {r}: step {s}" for r, s in enumerate(steps))
        raise CheckpointError(f"{what}: the ranks are not saving the same step ({ranks}); nothing is committed")
    return [p for _, p in parts]


def _failure(part: Any) -> Failed | None:
    """A rank's failure in what it sent: a Failed, alone or as the part of a ``(step, part)``."""
    if isinstance(part, Failed):
        return part
    if isinstance(part, tuple) and len(part) == 2 and isinstance(part[1], Failed):
        return part[1]
    return None


def check_parts(parts: list[Any], mine: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed (the failing rank re-raises its own error).
    A part may be a ``(step, part)`` pair (:func:`same_step`): check before unpacking it.

    The ranks report a KeyboardInterrupt or SystemExit too (the sites that gather them catch
    BaseException), so that the other ranks raise at once instead of waiting at the next
    gather until ``CKPT_DIST_TIMEOUT``; the interrupted rank re-raises it as it is."""
    failed = [f for f in map(_failure, parts) if f is not None]
    if not failed:
        return
    if mine is not None:
        if isinstance(mine, CheckpointError) or not isinstance(mine, Exception):
            raise mine
        raise CheckpointError(f"{what}: {type(mine).__name__}: {mine}") from mine
    kind = getattr(errors, failed[0].kind, CheckpointError)
    if not (isinstance(kind, type) and _ckpt_error(kind)):
        kind = CheckpointError
    raise kind(f"{what}: rank {failed[0].rank} failed: {failed[0].message}")
