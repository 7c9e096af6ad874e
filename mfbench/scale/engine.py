"""Where sweep, search and fleet tasks run: Ray (local by default, a cluster with an address)
or this process. One code path: a caller hands `map` a module-level function and its inputs
and gets results back as they finish."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mfbench.errors import InputError


class Engine:
    """`Engine()` starts a local Ray instance with `cpus` CPUs (default: all); `Engine(address=A)`
    joins the Ray cluster at A (`auto`, `HOST:6379` or `ray://HOST:10001`) and ships this copy of
    mfbench to it; `Engine(inline=True)` runs every task here, one after another."""

    def __init__(self, address: str | None = None, cpus: int | None = None, inline: bool = False):
        if cpus is not None and cpus <= 0:
            raise InputError(None, "--cpus", f"expected a positive number of CPUs, got {cpus}")
        self.inline, self.address, self.cpus = inline, address, cpus
        self._ray = None

    @property
    def name(self) -> str:
        return "in-process" if self.inline else f"Ray ({self.address or 'local'})"

    def _start(self):
        if self._ray is None:
            if self.address is None:  # a local instance on loopback only (Ray's single-machine mode)
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            import ray
            if not ray.is_initialized():
                os.environ.setdefault("RAY_DEDUP_LOGS", "0")
                options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
                if self.address is None:  # local: the workers inherit this environment (PYTHONPATH)
                    ray.init(num_cpus=self.cpus, **options)
                else:  # a cluster runs the code of this driver, whatever it has installed
                    import mfbench
                    try:
                        ray.init(address=self.address, **options,
                                 runtime_env={"py_modules": [str(Path(mfbench.__file__).parent)]})
                    except (ConnectionError, ValueError, RuntimeError) as e:
                        raise InputError(None, "--address", f"cannot join a Ray cluster at {self.address!r}: "
                                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._ray = ray
        return self._ray

    def map(self, fn: Callable, items: Iterable, window: int | None = None) -> Iterator[tuple[int, object]]:
        """(index, fn(item)) for every item, in the order they finish. At most `window` tasks
        are in flight (default: 4 per CPU), so inputs and results of a long sweep are never
        all held at once."""
        if self.inline:
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        ray = self._start()
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        window = window or 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: dict = {}
        items = iter(enumerate(items))
        while True:
            for i, item in items:
                pending[remote.remote(item)] = i
                if len(pending) >= window:
                    break
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)

    def shutdown(self) -> None:
        if self._ray is not None and self.address is None:
            self._ray.shutdown()
        self._ray = None
