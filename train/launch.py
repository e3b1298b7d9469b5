"""`python -m train.launch --workers N -- TRAIN_ARGS...`: run one multi-worker training as N local processes.

Each worker is `python -m train TRAIN_ARGS...` with a TF_CONFIG naming all N on free 127.0.0.1 ports (worker 0 is
the chief). Their output is forwarded line by line, prefixed "[worker K] ". Ctrl-C is passed on to every worker;
when one worker fails, the others are ended too (SIGKILL after a short grace: TensorFlow catches SIGTERM). The exit
status is 0 when all succeed, else the first failing worker's (128 + signal number for a killed one).

For tests, and for one big host whose GPUs are split among processes; on a cluster, the launcher of the cluster
(Slurm, Kubernetes) sets TF_CONFIG instead (README).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GRACE_SECONDS = 10.0  # how long the other workers get to print their own error before they are killed
LOOPBACK = "127.0.0.1"
NO_PROXY = "localhost,127.0.0.1"  # gRPC would send loopback traffic through an http(s)_proxy otherwise


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """What `python -m train.launch` accepts."""

    workers: int
    train_args: tuple[str, ...]
    start_delays: tuple[float, ...] = ()  # seconds to wait before starting worker k (tests start one late)


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """`n` distinct ports that were free on `host` a moment ago (bound to port 0 together, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(addresses: Sequence[str], index: int) -> str:
    """The TF_CONFIG of worker `index` in a cluster of workers at `addresses`."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})


def worker_env(addresses: Sequence[str], index: int, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of worker `index`: TF_CONFIG, no proxy for loopback, and this checkout on PYTHONPATH."""
    env = dict(base)
    env["TF_CONFIG"] = tf_config(addresses, index)
    for key in ("no_proxy", "NO_PROXY"):
        env[key] = ",".join(filter(None, [env.get(key, ""), NO_PROXY]))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def _forward(stream, prefix: str, sink) -> None:
    for line in stream:
        sink.write(f"{prefix}{line}")
        sink.flush()


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(config: LaunchConfig, *, python: str = sys.executable, stdout=None, stderr=None,
           grace_seconds: float = GRACE_SECONDS) -> int:
    """Run the workers to the end (see the module docstring); returns the exit status."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if config.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {config.workers}")
    addresses = [f"{LOOPBACK}:{port}" for port in free_ports(config.workers)]
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        for k in range(config.workers):
            delay = config.start_delays[k] if k < len(config.start_delays) else 0.0
            if delay and interrupted.wait(delay):
                break
            proc = subprocess.Popen(
                [python, "-m", "train", *config.train_args], env=worker_env(addresses, k),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
            )
            procs.append(proc)
            for stream, sink in ((proc.stdout, stdout), (proc.stderr, stderr)):
                thread = threading.Thread(target=_forward, args=(stream, f"[worker {k}] ", sink), daemon=True)
                thread.start()
                threads.append(thread)
        status = _supervise(procs, interrupted, config.workers, grace_seconds)
    finally:
        signal.signal(signal.SIGINT, previous)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for thread in threads:
            thread.join(timeout=5)
    return status


def _supervise(procs: list[subprocess.Popen], interrupted: threading.Event, expected: int, grace: float) -> int:
    """Wait for the workers; on a failure or Ctrl-C end the others. Returns the exit status."""
    status: int | None = None
    deadline = None
    while True:
        if interrupted.is_set() and status is None:
            status = 130
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + grace
        codes = [proc.poll() for proc in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and status is None:
            status = _exit_status(failed[0])
            deadline = time.monotonic() + grace
        if all(c is not None for c in codes) and (len(procs) == expected or status is not None):
            return status if status is not None else 0
        if deadline is not None and time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()  # SIGKILL: TensorFlow may catch SIGTERM and SIGINT while it waits on a collective
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, train_args = argv[:cut], argv[cut + 1 :]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(prog="python -m train.launch", usage="%(prog)s --workers N -- TRAIN_ARGS...",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, required=True, help="how many local worker processes (2 or more)")
    a = p.parse_args(own)
    if a.workers < 2:
        p.error(f"--workers must be at least 2, got {a.workers} (one worker is plain `python -m train`)")
    if not train_args:
        p.error("give the training arguments after --, e.g. -- DATA_DIR --backbone xception --out RUN_DIR")
    return launch(LaunchConfig(workers=a.workers, train_args=tuple(train_args)))


if __name__ == "__main__":
    sys.exit(main())
