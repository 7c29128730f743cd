"""A throw-away PostgreSQL server for the tests and benchmarks of the search on a database
server (tests/apps/search/test_postgresql.py, ``tools/benchmark.py scaling-search``).

The server is a cluster made by ``initdb`` in a temporary folder, started by ``pg_ctl`` on a
free local port and removed afterwards. pytest-postgresql's ``postgresql_proc`` would start
the same, but it runs pg_ctl as the current user, and PostgreSQL refuses to run as root
(pytest-postgresql issues #341, #455), as the tests run here and in many CI containers; as
root, this server runs as the ``postgres`` user.
"""
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Iterator, Optional

from d2kd.compat.cpu_distributed import free_local_port

#: the search's database user, as docs/cluster.md names it
ROLE = "detkds"


def postgres_bin() -> Optional[str]:
    """The folder of PostgreSQL's programs (initdb, pg_ctl, createuser, createdb): that of
    ``pg_ctl`` on PATH, links resolved (a link on PATH may stand for the server programs
    alone), else the newest /usr/lib/postgresql/<version>/bin (Debian's packages); None when
    PostgreSQL is absent."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(shutil.which("pg_ctl")))
    folders = [f for f in glob.glob("/usr/lib/postgresql/*/bin")
               if os.path.isfile(os.path.join(f, "initdb"))]
    return max(folders, key=lambda f: float(f.split("/")[-2]), default=None)


def server_user() -> Optional[str]:
    """The user that runs the server: None (this one) unless this is root, which PostgreSQL
    refuses; then ``postgres`` (PostgreSQL's packages create it), else ``nobody``."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return "nobody"


class PostgresServer:
    """A PostgreSQL cluster in ``folder`` (data, Unix socket, log) on 127.0.0.1:``port``,
    users without password; started on creation."""

    def __init__(self, bindir: str, folder: str, user: Optional[str]):
        self.bindir, self.folder = bindir, folder
        self.prefix = ["runuser", "-u", user, "--"] if user else []
        self.data, self.port = os.path.join(folder, "data"), free_local_port()
        self._role_made = False
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        self.start()

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(self.prefix + [os.path.join(self.bindir, program), *args],
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout,
                                                f"{program}: {done.stderr.strip()}")

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.folder, "server.log"),
                  "-w", "-t", "60", *args)

    def start(self) -> None:
        self._pg_ctl("-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                     "-c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: the server ends its clients' sessions (their transactions roll back)."""
        self._pg_ctl("-m", mode, "stop")

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database ``name`` owned by the search's role and its URL, made as
        docs/cluster.md makes them (createuser once, createdb; no password on this server)."""
        client = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        if not self._role_made:
            self._run("createuser", *client, ROLE)
            self._role_made = True
        self._run("createdb", *client, "--owner", ROLE, name)
        return self.url(name)


@contextlib.contextmanager
def throwaway_server(bindir: str) -> Iterator[PostgresServer]:
    """A started :class:`PostgresServer` in a new temporary folder; stopped and removed when
    the block ends."""
    folder = tempfile.mkdtemp(prefix="d2kd-postgres-")
    user = server_user()
    if user:
        shutil.chown(folder, user)
    try:
        server = PostgresServer(bindir, folder, user)
        yield server
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
