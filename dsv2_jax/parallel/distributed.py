"""Multi-host runs: one process per host, joined through JAX's coordination service.

    initialize()                                                    # TPU pod slice, SLURM, Open MPI, k8s: auto
    initialize("10.0.0.1:1234", num_processes=4, process_id=2)      # anywhere else (or the JAX_* variables)

Settings come from the arguments, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else
from JAX's cluster auto-detection; when a piece is still missing the error names the variable or flag to set.
On CPU the collectives run over gloo (TCP), so a multi-process run works on one box (that is how it is tested).

Failure: a watchdog thread in every process beats into the coordinator's key-value store; process 0 declares a
peer dead after `heartbeat_timeout` seconds without a beat, and a peer that loses the coordinator for that long
declares it dead. Either way every surviving process prints ONE line and exits with EXIT_PEER_LOST instead of
blocking in a collective forever; a process that fails on its own (`report_failure`) stops the others the same
way. A collective that fails because a peer died (gloo: "Connection reset by peer") is not such an error: the
process first waits out one heartbeat timeout for the watchdog's verdict. JAX's own heartbeat (which aborts with
a long log) is a backstop at four times the timeout, so under load the watchdog's one line and exit still come
first.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time

import jax
from jax._src import distributed as _jax_distributed  # the client, for its key-value store (as Orbax)

ENV_VARS = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator HOST:PORT", "num_processes": "--num-processes N",
         "process_id": "--process-id I"}
WHAT = {"coordinator": "coordinator address", "num_processes": "number of processes", "process_id": "process id"}
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
EXIT_PEER_LOST = 4
_KEY = "dsv2_jax/"  # our keys in the coordination service's key-value store


class DistributedError(RuntimeError):
    """Joining the other processes failed, or a setting is missing; the message says what to set."""


def _from_env(name: str, value, parse):
    if value is not None:
        return value
    raw = os.environ.get(ENV_VARS[name])
    if raw is None or raw == "":
        return None
    try:
        return parse(raw)
    except ValueError:
        raise DistributedError(f"{ENV_VARS[name]}={raw!r} is not a valid {WHAT[name]}") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> tuple[str | None, int | None, int | None]:
    """Explicit settings (arguments, else environment), validated; None where neither gives one."""
    coordinator = _from_env("coordinator", coordinator, str)
    num_processes = _from_env("num_processes", num_processes, int)
    process_id = _from_env("process_id", process_id, int)
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"coordinator address must be HOST:PORT, got {coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"number of processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise DistributedError(f"process id {process_id} is not in [0, {num_processes})")
    return coordinator, num_processes, process_id


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S, init_timeout: int = 300,
               label: str = "dsv2") -> None:
    """Joins this process to the others (idempotent); must run before anything touches a jax device.

    heartbeat_timeout: seconds after which a silent process counts as dead and the others exit.
    init_timeout: seconds to wait for every process to join. label: prefix of the one-line failure message."""
    if jax.distributed.is_initialized():
        return
    coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id)
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=init_timeout,
                                   heartbeat_timeout_seconds=int(4 * heartbeat_timeout + 5),
                                   shutdown_timeout_seconds=int(2 * heartbeat_timeout + 1))
    except ValueError as e:
        missing = [n for n, v in zip(ENV_VARS, (coordinator, num_processes, process_id)) if v is None]
        if "must be defined" not in str(e) and "should be defined" not in str(e) or not missing:
            raise DistributedError(f"multi-host initialization failed: {e}") from None
        raise DistributedError(
            "multi-host: no TPU / SLURM / MPI environment detected, so set "
            + ", ".join(f"{ENV_VARS[n]} (or {FLAGS[n]})" for n in missing) + " on every process") from None
    except Exception as e:  # a peer never joined within init_timeout, the coordinator is unreachable, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"joining the other processes (coordinator {coordinator or 'auto-detected'}) "
                               f"failed: {first}") from None
    if jax.process_count() > 1:
        _orbax_barriers_through_the_coordinator()
        _Watchdog(_jax_distributed.global_state.client, heartbeat_timeout, label).start()


def _orbax_barriers_through_the_coordinator() -> None:
    """Orbax syncs processes with device collectives by default; on CPU (gloo) those fail when processes arrive
    30 s apart, as they can around an asynchronous save. Its flag for the coordination service's barriers instead
    is an absl flag, so it is set directly (absl flags are otherwise unused here, hence mark_as_parsed)."""
    import orbax.checkpoint  # noqa: F401  (defines the flag)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def add_arguments(parser) -> None:
    """The multi-host flags shared by `dsv2 train` and `dsv2 generate`."""
    g = parser.add_argument_group("multi-host (one process per host)")
    g.add_argument("--distributed", action="store_true",
                   help="join the other processes: auto-detected on TPU / SLURM / MPI, else give the three "
                        "settings below (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (implies --distributed)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (implies --distributed)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (implies --distributed)")
    g.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="SECONDS",
                   help="a process silent this long counts as dead and the others exit "
                        f"(default {DEFAULT_HEARTBEAT_TIMEOUT_S})")


def initialize_from_args(args, label: str) -> bool:
    """Calls `initialize` when --distributed (or any of its settings) was given; True if it did."""
    wanted = args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if wanted:
        initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=args.heartbeat_timeout,
                   label=label)
    return wanted


def barrier(name: str, timeout: float = 3600) -> None:
    """Waits until every process arrives at barrier `name` (the coordination service's, not a device collective,
    so it tolerates any skew up to `timeout`; a process that dies meanwhile is caught by the watchdog)."""
    if jax.process_count() > 1:
        _jax_distributed.global_state.client.wait_at_barrier(_KEY + name, int(timeout * 1000))


def compile_together(jitted, *args) -> None:
    """Compiles `jitted` for `args` (arrays or ShapeDtypeStructs), then waits for the other processes, so their
    first collectives start together: gloo (the CPU collectives) gives up when processes arrive 30 s apart, as
    they can when one compiles slower. Later calls with matching arguments reuse the executable."""
    if jax.process_count() > 1:
        jitted.lower(*args).compile()
        barrier(f"compiled/{getattr(jitted, '__name__', 'fn')}")


def same_on_all_processes(value: int, what: str, hint: str = "") -> int:
    """`value` after checking every process computed the same one (a resume step, ...), through the
    coordination service's key-value store."""
    if jax.process_count() == 1:
        return value
    client, key = _jax_distributed.global_state.client, f"{_KEY}agree/{what}/"
    client.key_value_set(f"{key}{jax.process_index()}", str(int(value)), allow_overwrite=True)
    barrier(f"agree/{what}")
    values = {int(k.rsplit("/", 1)[-1]): int(v) for k, v in client.key_value_dir_get(key)}
    if len(set(values.values())) > 1:
        raise DistributedError(f"processes disagree on {what}: " + ", ".join(
            f"process {i}: {v}" for i, v in sorted(values.items())) + (f" ({hint})" if hint else ""))
    return value


def is_primary() -> bool:
    """Process 0 writes the shared files (metrics, configs), draws the progress bar and prints summaries."""
    return jax.process_index() == 0


def report_failure(error: BaseException | str, exit_status: int = 1) -> None:
    """This process is about to exit on an error: stops the other processes (each prints one line naming this
    process and the error) and makes this one exit with `exit_status` without waiting for them at shutdown.
    No-op in a single-process run."""
    watchdog = _Watchdog.current
    if watchdog is None:
        return
    if _may_mean_a_peer_died(error):
        watchdog.await_verdict()  # exits here, with the watchdog's one line, if a peer did die
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    watchdog.report(f"process {jax.process_index()} of {jax.process_count()} failed: {text}", exit_status)


# A collective whose peer died fails at once in the survivors (gloo: "Connection reset by peer"), before any
# heartbeat lapses; these words mark such transport failures, which wait for the watchdog's verdict.
_TRANSPORT_WORDS = ("gloo", "nccl", "connection", "peer", "socket", "broken pipe", "unavailable")


def _may_mean_a_peer_died(error: BaseException | str) -> bool:
    if not isinstance(error, (jax.errors.JaxRuntimeError, str)):
        return False
    text = str(error).lower()
    return any(w in text for w in _TRANSPORT_WORDS)


@contextlib.contextmanager
def stop_the_others_on_failure(user_errors: tuple[type[BaseException], ...] = ()):
    """Any exception leaving the block stops the other processes (`report_failure`: exit status 2 for
    `user_errors`, else 1), then propagates. No-op in a single-process run."""
    try:
        yield
    except BaseException as e:
        report_failure(e, exit_status=2 if isinstance(e, user_errors) else 1)
        raise


class _Watchdog(threading.Thread):
    current: _Watchdog | None = None

    def __init__(self, client, timeout: float, label: str):
        super().__init__(name="dsv2-distributed-watchdog", daemon=True)
        self.client, self.timeout, self.label = client, float(timeout), label
        self.index, self.count = jax.process_index(), jax.process_count()
        self.interval = max(min(self.timeout / 10, 1.0), 0.05)
        self.failed_status: int | None = None
        self.finished = threading.Event()
        _Watchdog.current = self
        atexit.register(self._at_exit)  # runs before JAX's own shutdown hook (registered at import)

    def run(self) -> None:
        beat, last_ok = 0, time.monotonic()
        seen = {p: (None, time.monotonic()) for p in range(self.count) if p != self.index}
        while not self.finished.is_set():
            now = time.monotonic()
            try:
                beat += 1
                self.client.key_value_set(f"{_KEY}beat/{self.index}", str(beat), allow_overwrite=True)
                failed = dict(self.client.key_value_dir_get(f"{_KEY}failed/"))
                if failed and self.failed_status is None:
                    self._die(next(iter(failed.values())))
                if self.index == 0:
                    done = {k.rsplit("/", 1)[-1] for k, _ in self.client.key_value_dir_get(f"{_KEY}done/")}
                    beats = {k.rsplit("/", 1)[-1]: v for k, v in self.client.key_value_dir_get(f"{_KEY}beat/")}
                    for p, (value, since) in seen.items():
                        if beats.get(str(p)) != value:
                            seen[p] = (beats.get(str(p)), now)
                        elif str(p) not in done and now - since > self.timeout:
                            message = (f"process {p} of {self.count} stopped responding (no heartbeat for "
                                       f"{self.timeout:.0f} s)")
                            self.client.key_value_set(f"{_KEY}failed/0", message, allow_overwrite=True)
                            self._die(message)
                last_ok = now
            except Exception:  # the coordinator (process 0) is gone, or the network is
                if now - last_ok > self.timeout:
                    self._die(f"lost the coordinator (process 0) for {self.timeout:.0f} s; it has probably died")
            self.finished.wait(self.interval)

    def await_verdict(self) -> None:
        """Gives the heartbeat time to show whether a peer died (then `_die` exits this process from the watchdog
        thread); returns when every peer still beats. Bounded: one timeout plus a few beat intervals."""
        time.sleep(self.timeout + 4 * self.interval + 1)

    def report(self, message: str, exit_status: int) -> None:
        self.failed_status = exit_status
        try:
            self.client.key_value_set(f"{_KEY}failed/{self.index}", message, allow_overwrite=True)
        except Exception:
            pass  # the coordinator is gone too; the others find out through the heartbeat

    def _die(self, message: str) -> None:
        if self.failed_status is not None:
            return  # this process is already exiting on its own error
        print(f"{self.label}: error: {message}; stopping. Rerun all processes to resume from the last complete "
              "checkpoint.", file=sys.stderr, flush=True)
        self._linger()
        _flush_and_exit(EXIT_PEER_LOST)

    def _linger(self) -> None:
        """Process 0 hosts the key-value store: give the others a moment to read why everyone is stopping."""
        if self.index == 0:
            time.sleep(3 * self.interval)

    def _at_exit(self) -> None:
        if self.failed_status is not None:
            # The others are stopping (or stuck in a collective): a shutdown barrier with them would only hang.
            self._linger()
            _flush_and_exit(self.failed_status)
        try:
            self.client.key_value_set(f"{_KEY}done/{self.index}", "1", allow_overwrite=True)
        except Exception:
            pass
        # No key-value calls once JAX's shutdown hook (next) has closed the client; its barrier is bounded by
        # shutdown_timeout_seconds.
        self.finished.set()
        self.join(timeout=self.timeout)


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)
