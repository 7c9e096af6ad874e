"""The control channel: a scheduling policy drives the native trainer over its stdin/stdout.

`mfbench-train --control stdio` writes one JSON line, an observation (the keys of
mfbench.contracts.policy.OBSERVATION, read from its telemetry), before every optimizer step
and waits for one JSON line, the decision. Here the same policy object the simulator calls
(`mfbench.policies.make("scheduling", spec)`, a built-in or a user's module:Class) answers
it, so a policy decides the same way in both for the same observations.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

from mfbench.contracts import policy


class ControlError(RuntimeError):
    """The trainer wrote something that is not an observation of the policy protocol."""


def serve(lines, reply, scheduling) -> int:
    """Answer each observation line from `lines` with `scheduling.decide(observation)`,
    checked, as one JSON line through `reply(text)`; return how many were answered. Stops when
    the trainer closes its stdout (the run ended) or can no longer be written to."""
    answered = 0
    for line in lines:
        try:
            obs = policy.observation(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            raise ControlError(f"control: expected an observation line (docs/contracts.md), got "
                               f"{line.strip()[:200]!r}: {e}") from None
        decision = policy.decide(scheduling, obs)
        try:
            reply(json.dumps(decision) + "\n")
        except BrokenPipeError:  # the trainer stopped (its exit code and last line say why)
            break
        answered += 1
    return answered


def run(cmd: list, scheduling=None, *, command=None, echo: bool = True,
        env: dict | None = None) -> tuple[int, list[str]]:
    """Run a trainer command; return (exit code, its stderr lines). Progress lines (not errors)
    are echoed to our stderr. With a `scheduling` policy, `--control stdio --policy <class
    name>` is added and the policy drives the run (a policy error stops the trainer and is
    raised). `command`, a runner's (mfbench.device.runners), turns the trainer's arguments
    into the command that runs them on its target; without it `cmd` is the command. Ctrl-C
    reaches the trainer too: its pipes stay open while it checkpoints and stops."""
    cmd = [*map(str, cmd)]
    if scheduling is not None:
        cmd += ["--control", "stdio", "--policy", type(scheduling).__name__]
    if command is not None:
        cmd = command(cmd)
    controlled = scheduling is not None
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if controlled else subprocess.DEVNULL,
                            stdout=subprocess.PIPE if controlled else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env)
    lines: list[str] = []

    def pump():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if echo and "error:" not in line:
                print(line, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def reply(text):
        proc.stdin.write(text)
        proc.stdin.flush()

    if controlled:
        try:
            serve(proc.stdout, reply, scheduling)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue
    reader.join()
    return code, lines
