"""Dagster instance storage in PostgreSQL: a real server, a real materialisation, read back.

The fixture starts a throwaway PostgreSQL server (Debian's `postgresql` package, installed by
`.ci/system-deps`) on 127.0.0.1 with a free port, and the test points the documented
`dagster_home/dagster-postgres.yaml` at it through its DAGSTER_PG_* variables, so the example
a user copies is the one under test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from pipelines.assets import listing_manifest, raw_images, unique_images
from pipelines.resources import StorageResource, profile_resources
from tests.conftest import free_port

psycopg2 = pytest.importorskip(
    "psycopg2", reason="psycopg2 is not installed: pip install 'carmodels[postgres]'"
)
pytest.importorskip(
    "dagster_postgres",
    reason="dagster-postgres is not installed: pip install 'carmodels[postgres]'",
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "dagster_home" / "dagster-postgres.yaml"
DEMO_LISTINGS = 24
ASSETS = [listing_manifest, raw_images, unique_images]
#: PostgreSQL refuses to run as root; as root the server runs as this account instead.
SERVER_ACCOUNT = "postgres"


def _postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: `pg_config --bindir`, else Debian's layout."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        proc = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if proc.returncode == 0:
            candidates.append(Path(proc.stdout.strip()))
    # Debian installs the server under a versioned folder and puts only clients on PATH; the
    # newest version comes first.
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versioned)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _as_server_account() -> tuple[list[str], str | None]:
    """The command prefix that runs PostgreSQL's tools as a non-root user, and that user.

    Not root: the tools run as we are. Root: through `runuser` as the `postgres` account
    Debian's package creates; without either the test is skipped (initdb refuses root).
    """
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        pytest.skip(f"running as root and there is no {SERVER_ACCOUNT!r} account to run initdb as")
    if runuser is None:
        pytest.skip("running as root and `runuser` is missing, so initdb cannot drop root")
    return [runuser, "-u", SERVER_ACCOUNT, "--"], SERVER_ACCOUNT


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    username: str
    password: str
    db_name: str

    def connect(self):  # noqa: ANN201 - psycopg2's connection type is untyped
        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.username,
            password=self.password,
            dbname=self.db_name,
        )


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        server_log = log.read_text() if log is not None and log.exists() else ""
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(command)}\n"
            f"{proc.stdout}\n{proc.stderr}\n{server_log}"
        )


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on 127.0.0.1, with password authentication over TCP."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found via `pg_config --bindir` or "
            "/usr/lib/postgresql/*/bin: install Debian's `postgresql` (.ci/system-deps does)"
        )
    prefix, account = _as_server_account()
    # Not under pytest's tmp_path: its parents are private to root, and the server account
    # must reach its data folder and socket.
    workdir = Path(tempfile.mkdtemp(prefix="carmodels-pg-"))
    data_dir = workdir / "data"
    log = workdir / "server.log"
    password = "carmodels-test"
    password_file = workdir / "password"
    password_file.write_text(password + "\n")
    if account is not None:
        entry = pwd.getpwnam(account)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
        os.chown(password_file, entry.pw_uid, entry.pw_gid)
    port = free_port()
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data_dir)]
    started = False
    try:
        _run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                f"--pwfile={password_file}",
                # Local socket trusted (only this test's user reaches it); TCP needs the
                # password, as a real deployment does.
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
        _run(
            [
                *pg_ctl,
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off",
                "start",
            ],
            "pg_ctl start",
            log,
        )
        started = True
        _run(
            [
                *prefix,
                str(bindir / "createdb"),
                "-h",
                str(workdir),
                "-p",
                str(port),
                "-U",
                "postgres",
                "dagster",
            ],
            "createdb",
            log,
        )
        yield PostgresServer("127.0.0.1", port, "postgres", password, "dagster")
    finally:
        if started:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_home(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A DAGSTER_HOME holding the documented PostgreSQL example, pointed at the test server."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(EXAMPLE_CONFIG, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_HOST", postgres_server.host)
    monkeypatch.setenv("DAGSTER_PG_PORT", str(postgres_server.port))
    monkeypatch.setenv("DAGSTER_PG_USERNAME", postgres_server.username)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres_server.password)
    monkeypatch.setenv("DAGSTER_PG_DB", postgres_server.db_name)
    return home


def test_example_config_stores_everything_in_postgres(postgres_home: Path) -> None:
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        # The run-queue, pool and run-monitoring settings travel with the example, as in
        # dagster.yaml, so switching storage does not loosen the GPU pool.
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs == 2
        assert instance.run_monitoring_enabled


# About 7 s (3 assets through a real server): under the ~10 s bar for `slow`, so `make
# test-fast` keeps PostgreSQL covered.
def test_materialisation_is_stored_in_postgres_and_read_back(
    postgres_server: PostgresServer, postgres_home: Path, tmp_path: Path
) -> None:
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        **profile_resources("demo", demo_listings=DEMO_LISTINGS),
    }
    with dg.DagsterInstance.from_config(str(postgres_home)) as instance:
        result = dg.materialize(ASSETS, resources=resources, instance=instance)
        assert result.success
        run_id = result.run_id

    # A fresh instance object: everything below comes back from the database.
    with dg.DagsterInstance.from_config(str(postgres_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None, f"run {run_id} is not in PostgreSQL"
        assert run.status == dg.DagsterRunStatus.SUCCESS
        records = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
        materialised = {record.asset_key.to_user_string() for record in records}
        assert materialised == {asset.key.to_user_string() for asset in ASSETS}
        for asset in ASSETS:
            event = instance.get_latest_materialization_event(asset.key)
            assert event is not None and event.run_id == run_id
        raw_metadata = next(
            record.asset_materialization.metadata
            for record in records
            if record.asset_key == raw_images.key
        )
        assert raw_metadata["urls"].value >= DEMO_LISTINGS

    # And the rows are really in PostgreSQL, not in a SQLite file beside the home.
    with postgres_server.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cursor.fetchall() == [("SUCCESS",)]
        cursor.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
            (run_id, "ASSET_MATERIALIZATION"),
        )
        assert cursor.fetchone() == (len(ASSETS),)
    connection.close()
    assert not list(postgres_home.rglob("*.db")), "Dagster wrote SQLite files instead"
