"""A throwaway PostgreSQL server for the tests and the demo: initdb, start, create a database, stop.

The server runs from the machine's PostgreSQL binaries (`CONVEYOR_PG_BINDIR`, else
`pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else `initdb` on PATH), with
trust authentication, listening on 127.0.0.1 only on a free port, its unix socket in the data
directory, and durability switched off (fsync, full_page_writes) because the data is disposable.
initdb and postgres refuse to run as root, so under euid 0 every server command runs as the
`postgres` system user (the Debian `postgresql` package creates it) and the data directory is
created owned by it; when that user cannot reach the given directory (pytest's base temp dir is
mode 0700), the data goes to a fresh directory under the system temp dir instead, removed at
stop. `python -m conveyor.store.pgserver DIR` runs one in the foreground and prints its URL.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from conveyor.net import free_ports

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes; a longer data dir gets TCP only.
_MAX_SOCKET_PATH = 100
# Each server command is bounded: initdb takes ~1 s, start/stop well under 10 s on a sane machine.
_COMMAND_TIMEOUT_S = 120.0
_START_ATTEMPTS = 3  # a free port can be taken between probing it and the server binding it
_SERVER_SETTINGS = (
    "listen_addresses = '127.0.0.1'",
    "fsync = off",  # throwaway data: durability only costs time here
    "full_page_writes = off",
    "synchronous_commit = off",
    "max_connections = 50",
    "shared_buffers = 32MB",  # small, so several test servers fit on a CI runner
)


class PostgresUnavailableError(RuntimeError):
    """PostgreSQL server binaries are missing or the server could not be started."""


def find_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres; raises `PostgresUnavailableError`."""
    candidates: list[Path] = []
    if env := os.environ.get("CONVEYOR_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresUnavailableError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; tried "
        f"{[str(c) for c in candidates] or 'nothing'}. Install them (Debian/Ubuntu: "
        "apt-get install postgresql) or set CONVEYOR_PG_BINDIR."
    )


def _server_user() -> pwd.struct_passwd | None:
    """The account server commands run as: None means the current one."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailableError(
            "running as root, but PostgreSQL refuses root and there is no 'postgres' system user "
            "(the Debian 'postgresql' package creates it); run as a normal user or create it"
        ) from None


class PgServer:
    """One disposable PostgreSQL server; use as a context manager or call start()/stop()."""

    def __init__(self, base_dir: Path, *, bindir: Path | None = None, timeout_s: float = 60.0):
        self._base_dir = Path(base_dir)
        self._bindir = bindir
        self._timeout_s = timeout_s
        self._user = _server_user()
        self._owned_tmp: Path | None = None  # fallback dir we must delete at stop
        self.data_dir = self._base_dir / "pgdata"
        self.port = 0
        self._running = False

    @property
    def log_file(self) -> Path:
        """The server's log (pg_ctl -l); its tail is quoted in start errors."""
        return self.data_dir.parent / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        """libpq URL of a database on this server (user postgres, trust auth, TCP)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> str:
        """initdb (once) and start the server; returns the URL of the `postgres` database."""
        bindir = self._bindir or find_bindir()
        deadline = time.monotonic() + self._timeout_s
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            initdb_flags = "-U postgres --auth=trust --encoding=UTF8 --no-locale --no-sync"
            initdb = [str(bindir / "initdb"), "-D", str(self.data_dir), *initdb_flags.split()]
            self._run(initdb, deadline)
            self._write_settings()
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(self.data_dir)]
        leftover = (self.data_dir / "postmaster.pid").exists()
        if leftover and self._run([*pg_ctl, "status"], deadline, check=False):
            # A server left running on this data dir (an earlier demo): its port is unknown.
            self._run([*pg_ctl, "stop", "-m", "fast", "-w"], deadline)
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_ports()[0]
            wait_s = str(max(1, int(deadline - time.monotonic())))
            start = ["start", "-l", str(self.log_file), "-w", "-t", wait_s, "-o", f"-p {self.port}"]
            try:
                self._run([*pg_ctl, *start], deadline)
                break
            except PostgresUnavailableError:
                if attempt == _START_ATTEMPTS or time.monotonic() >= deadline:
                    raise
                log.warning("postgres start failed port=%s attempt=%s", self.port, attempt)
        self._running = True
        atexit.register(self.stop)  # never leave an orphan server behind a crashed session
        self._wait_ready(deadline)
        log.info("postgres started port=%s data_dir=%s", self.port, self.data_dir)
        return self.url()

    def create_database(self, name: str) -> str:
        """Create database `name` (if missing) and return its URL."""
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast, then immediate) and remove a fallback temp dir; idempotent."""
        if self._running:
            pg_ctl = [str((self._bindir or find_bindir()) / "pg_ctl"), "-D", str(self.data_dir)]
            # Bounded: a fast stop takes well under a second; a stuck one gets immediate mode.
            fast = [*pg_ctl, "stop", "-m", "fast", "-w"]
            if not self._run(fast, time.monotonic() + 60, check=False):
                log.warning("postgres fast stop failed, stopping immediately port=%s", self.port)
                self._run([*pg_ctl, "stop", "-m", "immediate", "-w"], time.monotonic() + 30)
            self._running = False
            atexit.unregister(self.stop)
            log.info("postgres stopped port=%s", self.port)
        if self._owned_tmp is not None:
            shutil.rmtree(self._owned_tmp, ignore_errors=True)
            self._owned_tmp = None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _prepare_dirs(self) -> None:
        self._base_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None and not self._user_can_enter(self._base_dir):
            # The postgres user cannot traverse to base_dir: use a temp dir it can reach.
            self._owned_tmp = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
            self.data_dir = self._owned_tmp / "pgdata"
            log.info(
                "postgres data dir moved data_dir=%s reason=base_dir_unreachable_by=%s",
                self.data_dir,
                self._user.pw_name,
            )
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            # initdb wants to own the data dir; pg_ctl -l writes the log as the server user.
            self.log_file.touch()
            owned = [self.data_dir, self.log_file]
            if self._owned_tmp is not None:
                owned.append(self._owned_tmp)
            for path in owned:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _user_can_enter(self, path: Path) -> bool:
        probe = subprocess.run(
            ["test", "-x", str(path)],
            cwd="/",
            env=self._env(),
            timeout=10,
            user=self._uid,
            group=self._gid,
            extra_groups=self._extra_groups,
        )
        return probe.returncode == 0

    def _write_settings(self) -> None:
        settings = list(_SERVER_SETTINGS)
        socket_dir = str(self.data_dir)
        # An over-long socket path is fatal to postgres; TCP alone serves the tests.
        too_long = len(socket_dir) + len("/.s.PGSQL.65535.lock") > _MAX_SOCKET_PATH
        settings.append(f"unix_socket_directories = '{'' if too_long else socket_dir}'")
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# conveyor.store.pgserver\n" + "\n".join(settings) + "\n")

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid

    @property
    def _extra_groups(self) -> list[int] | None:
        # Drop root's supplementary groups along with its uid.
        return None if self._user is None else []

    def _env(self) -> dict[str, str]:
        # Inherited PG* variables (PGDATA, PGPORT, PGHOST...) would redirect the commands.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._user is not None:
            env["HOME"] = self._user.pw_dir
        return env

    def _run(self, argv: list[str], deadline: float, *, check: bool = True) -> bool:
        """Run a server command as the server user; True if it succeeded."""
        timeout = min(_COMMAND_TIMEOUT_S, max(1.0, deadline - time.monotonic()))
        try:
            done = subprocess.run(
                argv,
                cwd=str(self.data_dir.parent),
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                user=self._uid,
                group=self._gid,
                extra_groups=self._extra_groups,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresUnavailableError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
        if done.returncode != 0 and check:
            raise PostgresUnavailableError(
                f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} failed "
                f"rc={done.returncode}\n{done.stdout}{done.stderr}{self._log_tail()}"
            )
        return done.returncode == 0

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "server log (tail):\n" + "\n".join(lines[-20:])

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise PostgresUnavailableError(f"postgres not ready: {exc}") from exc
                time.sleep(0.05)  # polling a starting server; bounded by the deadline


def main() -> None:
    """Run a server in the foreground until SIGINT/SIGTERM; prints the database URL."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("var/postgres")
    dbname = sys.argv[2] if len(sys.argv) > 2 else "conveyor"
    server = PgServer(base)
    server.start()
    try:
        print(server.create_database(dbname), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
