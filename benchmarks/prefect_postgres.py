#!/usr/bin/env python3
"""The deployment end to end on Prefect's server backed by a real PostgreSQL, outside containers
(issue 14): a throwaway PostgreSQL cluster (Debian's package) on 127.0.0.1, `prefect server start`
on it, `diffcl serve` (the deployment diffcl/full-pipeline of the packaged demo config, with its
cron schedule) in an empty folder, and `prefect deployment run diffcl/full-pipeline` twice.

    nice -n 10 .venv/bin/python benchmarks/prefect_postgres.py

It prints where PostgreSQL and the server run (and that the server's database is PostgreSQL: the
server's own settings, and the flow runs read back from PostgreSQL with psql), the deployment's
schedule, each run's final state and task-run states (the second run: every stage but fetch a cache
hit), then the checks and the timings (PostgreSQL start, server start, deployment registered, first
run, second run). Everything it started is stopped again, also on failure; the exit status is 1 when
a check fails. Without PostgreSQL it prints `skipped: ...` and exits 0.

PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres` system user
(else `nobody`) in a temporary folder that user owns. `DIFFCL_PG_BENCH_EPOCHS=N` serves the
deployment with `--set train.epochs=N` (default: the demo config's own).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: prefect, diffcl
DEPLOYMENT = "diffcl/full-pipeline"
EXPECTED_CRON = "0 3 * * 1"  # orchestration.cron of the demo config
NOT_CACHED = {"fetch"}  # the one stage that is never cached
PG_USER = "prefect"  # the cluster's superuser (trust auth on 127.0.0.1 only)
SKIP_MESSAGE = "skipped: PostgreSQL is not installed (apt-get install postgresql)"
RUN_TIMEOUT_S = 1800


@dataclass
class Report:
    skipped: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    task_states: list[dict[str, int]] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.error is None and bool(self.checks) and all(self.checks.values()))

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks[name] = bool(passed)
        say(f"check {'ok  ' if passed else 'FAIL'} {name}{': ' + detail if detail else ''}")


def say(line: str) -> None:
    print(line, flush=True)


def find_pg_bin() -> Path | None:
    """The folder of initdb and pg_ctl: PATH first, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway cluster: initdb in a temporary folder, trust auth for 127.0.0.1 only, listening on
    127.0.0.1 only (its Unix socket in the cluster's own folder)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.os_user: str | None = None
        if os.geteuid() == 0:
            self.os_user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            if self.os_user is None:
                raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")
        self.dir = Path(tempfile.mkdtemp(prefix="diffcl-pg-"))
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.started = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self.os_user, "--", *cmd] if self.os_user else cmd

    def _run(self, tool: str, *args: str) -> str:
        proc = subprocess.run(self._cmd(tool, *args), cwd=self.dir, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-locale")
        # Only TCP from 127.0.0.1 is let in (no line for the Unix socket: refused).
        (self.data / "pg_hba.conf").write_text("# diffcl benchmark: trust, 127.0.0.1 only\n"
                                               "host all all 127.0.0.1/32 trust\n")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")  # throwaway data
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.started = True
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "prefect")

    def psql(self, sql: str) -> str:
        return self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", "prefect",
                         "-At", "-v", "ON_ERROR_STOP=1", "-c", sql).strip()

    @property
    def version(self) -> str:
        return self.psql("show server_version")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/prefect"

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Proc:
    """A background process in its own process group, output to a log file; stopped with a signal to
    the group, then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name, self.log = name, log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 30) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # children left behind in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._out.close()

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(f"  | {line}" for line in text[-lines:])


def wait_for(what: str, probe, timeout_s: float, proc: Proc | None = None, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = probe()
        except Exception:  # noqa: BLE001 - not up yet
            result = None
        if result:
            return result
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                               + (f":\n{proc.tail()}" if proc else ""))
        time.sleep(every_s)


async def _read(api: str, coro_fn):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        return await coro_fn(client)


def read(api: str, coro_fn):
    return asyncio.run(_read(api, coro_fn))


def task_states(api: str, flow_run_id: str) -> tuple[collections.Counter, dict[str, str]]:
    """Counts of the flow run's task-run state names, and each stage's state (by task name)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch(client):
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    runs = sorted(read(api, fetch), key=lambda t: (t.start_time or t.expected_start_time or t.created, t.name))
    by_stage = {}
    for t in runs:  # task run names are <task name>-<suffix>
        by_stage[t.name.rsplit("-", 1)[0]] = t.state.name if t.state else "?"
    return collections.Counter(t.state.name if t.state else "?" for t in runs), by_stage


def run_deployment(api: str, env: dict[str, str], cwd: Path, number: int, report: Report) -> str | None:
    """`prefect deployment run`, then the flow run polled to a final state; its id."""
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", DEPLOYMENT], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout)
    if proc.returncode or not match:
        raise RuntimeError(f"prefect deployment run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run_id = match.group(1)

    def final():
        run = read(api, lambda c: c.read_flow_run(run_id))
        return run if run.state and run.state.is_final() else None

    run = wait_for(f"flow run {run_id} to finish", final, RUN_TIMEOUT_S, every_s=2)
    seconds = time.perf_counter() - start
    report.timings[f"run {number} (trigger to final state)"] = seconds
    counts, by_stage = task_states(api, run_id)
    report.task_states.append(dict(counts))
    say(f"run {number}: flow run {run.name} ({run_id}) {run.state.name} in {seconds:.1f} s "
        f"(server-side run time {run.total_run_time.total_seconds():.1f} s); task runs: {dict(sorted(counts.items()))}")
    say(f"  stages: {', '.join(f'{k}={v}' for k, v in by_stage.items())}")
    report.check(f"run {number} Completed", run.state.name == "Completed", run.state.name)
    if number == 2:
        cached = {s for s, state in by_stage.items() if state == "Cached"}
        missing = set(by_stage) - cached - NOT_CACHED
        report.check("run 2: every stage but fetch a cache hit", bool(cached) and not missing,
                     f"{len(cached)} of {len(by_stage)} stages Cached"
                     + (f"; not cached: {', '.join(sorted(missing))}" if missing else f" (not cached: {', '.join(sorted(set(by_stage) - cached))})"))
    return run_id


def main() -> Report:
    report = Report()
    bindir = find_pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        report.skipped = SKIP_MESSAGE
        say(SKIP_MESSAGE)
        return report

    tmp = Path(tempfile.mkdtemp(prefix="diffcl-prefect-pg-"))
    home, work = tmp / "prefect-home", tmp / "work"
    home.mkdir()
    work.mkdir()
    pg: Postgres | None = None
    server: Proc | None = None
    serve: Proc | None = None
    try:
        # ------------------------------------------------------------ PostgreSQL
        start = time.perf_counter()
        pg = Postgres(bindir)
        pg.start()
        report.timings["PostgreSQL start (initdb, start, createdb)"] = time.perf_counter() - start
        say(f"PostgreSQL {pg.version} ({bindir}) on 127.0.0.1:{pg.port}"
            f"{f', run as {pg.os_user}' if pg.os_user else ''}: started in {report.timings['PostgreSQL start (initdb, start, createdb)']:.1f} s")

        # ------------------------------------------------------------ Prefect server
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        base_env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        server_env = {**base_env, "PREFECT_API_DATABASE_CONNECTION_URL": pg.url}
        client_env = {**base_env, "PREFECT_API_URL": api}
        start = time.perf_counter()
        server = Proc("prefect server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                      server_env, tmp, tmp / "server.log")
        import httpx

        wait_for("the server's /api/health", lambda: httpx.get(f"{api}/health", timeout=5).json() is True, 240, server)
        report.timings["Prefect server start (to /api/health)"] = time.perf_counter() - start
        version = httpx.get(f"{api}/admin/version", timeout=10).json()
        say(f"Prefect server {version} on {api}: healthy in {report.timings['Prefect server start (to /api/health)']:.1f} s "
            "(its /api/admin/settings masks the database URL: checked from PostgreSQL's side)")
        # The server's connection pool, seen by PostgreSQL (this psql session left out).
        conns = int(pg.psql("select count(*) from pg_stat_activity where datname = 'prefect' and pid <> pg_backend_pid()"))
        report.check("the server is connected to PostgreSQL", conns > 0,
                     f"{conns} connection(s) to database prefect in pg_stat_activity")
        tables = int(pg.psql("select count(*) from information_schema.tables where table_schema = 'public'"))
        report.check("Prefect's tables are in PostgreSQL", tables > 10 and pg.psql("select to_regclass('flow_run')") == "flow_run",
                     f"{tables} tables in database prefect")

        # ------------------------------------------------------------ diffcl serve
        cmd = [str(BIN / "diffcl"), "serve"]
        if epochs := os.environ.get("DIFFCL_PG_BENCH_EPOCHS"):
            cmd += ["--set", f"train.epochs={int(epochs)}"]
        start = time.perf_counter()
        serve = Proc("diffcl serve", cmd, client_env, work, tmp / "serve.log")
        deployment = wait_for(f"deployment {DEPLOYMENT}", lambda: read(api, lambda c: c.read_deployment_by_name(DEPLOYMENT)),
                              300, serve, every_s=2)
        report.timings["diffcl serve: deployment registered"] = time.perf_counter() - start
        for s in deployment.schedules:
            sched = s.schedule
            desc = f"cron {getattr(sched, 'cron', sched)!r} ({getattr(sched, 'timezone', None) or 'UTC'}), {'active' if s.active else 'inactive'}"
            report.schedules.append(desc)
        say(f"deployment {DEPLOYMENT} ({deployment.id}): parameters {deployment.parameters}; "
            f"concurrency limit {deployment.global_concurrency_limit.limit if deployment.global_concurrency_limit else deployment.concurrency_limit}")
        say(f"  schedules: {'; '.join(report.schedules) or 'none'}")
        report.check("deployment's schedule registered",
                     any(getattr(s.schedule, "cron", None) == EXPECTED_CRON and s.active for s in deployment.schedules),
                     f"expected cron {EXPECTED_CRON!r}, active")

        # ------------------------------------------------------------ two runs
        ids = [run_deployment(api, client_env, work, n, report) for n in (1, 2)]

        # ------------------------------------------------------------ read back from PostgreSQL
        rows = pg.psql("select id || ' ' || state_name from flow_run where id in "
                       f"('{ids[0]}', '{ids[1]}') order by start_time")
        scheduled = pg.psql("select count(*) from flow_run fr join deployment d on d.id = fr.deployment_id "
                            "where fr.state_type = 'SCHEDULED'")
        n_schedules = pg.psql("select count(*) from deployment_schedule")
        say(f"read back from PostgreSQL: flow runs {rows.replace(chr(10), '; ')}; "
            f"deployment_schedule rows {n_schedules}; scheduled flow runs created by the server's scheduler {scheduled}")
        report.check("both flow runs stored in PostgreSQL as Completed",
                     sorted(line.split()[-1] for line in rows.splitlines()) == ["Completed", "Completed"])
    except Exception as err:  # noqa: BLE001 - reported, then everything is torn down
        report.error = f"{type(err).__name__}: {err}"
        say(f"error: {report.error}")
        for proc in (serve, server):
            if proc is not None:
                say(f"last lines of {proc.name}'s log:\n{proc.tail(40)}")
    finally:
        start = time.perf_counter()
        if serve is not None:
            serve.stop(signal.SIGINT, 60)  # a clean Ctrl-C: Prefect pauses the schedule on shutdown
        if server is not None:
            server.stop(signal.SIGTERM, 30)
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        report.timings["teardown"] = time.perf_counter() - start

    say("")
    say("timings:")
    for name, seconds in report.timings.items():
        say(f"  {seconds:7.1f} s  {name}")
    passed = sum(report.checks.values())
    say(f"checks: {passed} of {len(report.checks)} passed" + (f"; error: {report.error}" if report.error else ""))
    say("OK" if report.ok else "FAILED")
    return report


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
