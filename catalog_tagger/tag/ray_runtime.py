"""The Ray this process uses: start the embedded local Ray sized to the machine, or join a cluster, and shut it
down; signals are held while Ray starts or stops (a Ctrl-C inside either has ended in a segfault).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger(__name__)

OBJECT_STORE_MAX_BYTES = 2 * 1024**3  # embedded local Ray: object store at most 2 GiB...
OBJECT_STORE_RAM_FRACTION = 0.30  # ...and at most 30% of RAM (bounded memory; Ray's own default is 30% of RAM)


def ray_address(address: str | None) -> str:
    """None/"" -> $RAY_ADDRESS when set, else "local" (never a stray ``ray start`` cluster found on disk)."""
    if address in (None, ""):
        return os.environ.get("RAY_ADDRESS") or "local"
    return address


def _object_store_bytes() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return OBJECT_STORE_MAX_BYTES
    return int(min(OBJECT_STORE_MAX_BYTES, OBJECT_STORE_RAM_FRACTION * ram))


@contextmanager
def signals_held() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM instead of acting on them during the block (main thread only; elsewhere Python
    delivers no signals), then put the handlers back. A Ctrl-C inside Ray's start-up or shut-down has ended in a
    segfault. ``ray.init`` also installs its own SIGTERM handler (``sys.exit``): it is kept only where no handler
    was set before (a caller's own handler, such as the CLI's, wins)."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def hold(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - the signal handler signature
        held.append(signum)

    before = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for sig, handler in before.items():
            if handler in (signal.SIG_DFL, None) and signal.getsignal(sig) is not hold:
                continue  # Ray installed one where there was none: keep it
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def init_ray(address: str | None) -> bool:
    """Connect to a cluster, or start the embedded local Ray sized to this machine (reused when running).

    ``None`` means ``$RAY_ADDRESS`` when set, else an embedded local Ray started with ``address="local"``: a bare
    ``ray.init()`` would attach to any cluster a ``ray start`` left on this machine. Returns whether this call
    started (or connected) Ray. An interrupt while Ray starts is held until it has started, then Ray is shut down
    and the interrupt delivered.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with signals_held() as held:
        try:
            _start_ray(ray_address(address))
        except SystemExit:  # the SIGTERM handler ray.init installs first thing fired: stop like on a held SIGTERM
            held.append(signal.SIGTERM)
    if held:
        shutdown_ray()
        signal.raise_signal(held[0])
    return True


def shutdown_ray() -> None:
    """Shut down the Ray this process started or connected, before the interpreter exits (interrupts held: we are
    stopping already, and a second Ctrl-C must not cut the shutdown short)."""
    import ray

    log.info("shutting down Ray")
    with signals_held():
        ray.shutdown()


def _start_ray(address: str) -> None:
    """``ray.init`` of the embedded local Ray (``address="local"``) or of a cluster's driver."""
    import ray

    if address == "local":
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=_object_store_bytes(),
        )
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as err:
            raise ConnectionError(f"cannot connect to Ray at {address!r}: {err}") from err
