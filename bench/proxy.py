"""Our proxy vs LiteLLM's in front of one canned loopback upstream, side by side in one run: added latency p50/p99
at concurrency 1 and 32, the highest RPS each sustains with p99 added ≤ 50 ms (one worker each), and the shadow
stage's cost on the teacher path.

    .venv/bin/python bench/proxy.py [--quick] [--no-litellm] [--rounds 2]

Method. Three targets get the same requests (same body, fresh keep-alive connections per measurement) from one
closed-loop generator (bench/support/load.py): (a) the canned upstream directly, (b) `slmswap serve --workers 1`
with capture on (SQLite), (c) `litellm --num_workers 1` (no database). At each concurrency 1, 2, 4, ... 128 the
targets are measured in interleaved rounds (so drift on a shared machine hits all alike); added latency at a
percentile = the target's percentile − direct's at the same concurrency (a difference of percentiles: requests
are not paired). A target sustains a concurrency when its added p99 there is ≤ 50 ms; its sustained RPS is the
best throughput among the concurrencies it sustains ("none" when even concurrency 1 misses it: on a loaded
machine a scheduler stall alone can cost 50 ms); peak RPS is the best at any concurrency. Direct's throughput at
each concurrency is the ceiling of generator + upstream: a proxy measured well under it is not limited by the
generator. CPU per request is each server's own CPU time (/proc, its process group) over the requests it
answered, the figure least moved by other load on the machine; its inverse, the one-core capacity, is what one
worker would answer with a core to itself. Shadow: a route at stage `shadow` whose student waits 200 ms (a busy
student) vs the teacher-stage route, same proxy, interleaved; the difference of their added p50 is the shadow's
cost (with the default `shadow_concurrency`, so most shadow runs are shed and counted).

Targets (issue "Proxy"): our added p50 ≤ 1 ms at concurrency 1; ≥ 4× LiteLLM's sustained RPS per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support.load import Run, Target, drive, event_loop_policy  # noqa: E402
from bench.support.procs import Server, free_port  # noqa: E402

LITELLM_PIN = "1.108.7"
LITELLM_VENV = Path.home() / ".cache" / "slm-swap" / "bench-venv-litellm"
LITELLM_KEY = "sk-bench-litellm-master"  # a throwaway master key for a loopback-only server
P99_BOUND_MS = 50.0
SLOW_STUDENT_S = 0.2
LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_LEVELS = (1, 8, 32, 64)
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 8}


# ---- the servers -----------------------------------------------------------------------------------------------

def litellm_venv(skip: bool) -> Path | None:
    """The bench venv's `litellm`, created on first use; None (with the command to run by hand) when it fails."""
    exe = LITELLM_VENV / "bin" / "litellm"
    pip = LITELLM_VENV / "bin" / "pip"
    command = f"python3 -m venv {LITELLM_VENV} && {pip} install 'litellm[proxy]=={LITELLM_PIN}'"
    if skip:
        return None
    if not exe.exists():
        print(f"creating the LiteLLM bench venv (once): {command}", flush=True)
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        if done.returncode != 0 or not exe.exists():
            print(f"could not install LiteLLM (exit {done.returncode}): {done.stderr.strip()[-600:]}\n"
                  f"run it by hand and rerun: {command}; measuring without LiteLLM")
            return None
    return exe


def litellm_version() -> str:
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def our_config(tmp: Path, upstream: int, slow: int) -> None:
    # max_concurrency far above the sweep: the bench measures saturation, not the proxy's 429 shedding. The shadow
    # route is frozen (auto = false) so the gates cannot move it to canary mid-run and let the slow student answer.
    (tmp / "slmswap.toml").write_text(f'''[store]
url = "sqlite:///{tmp}/calls.db"

[proxy]
max_concurrency = 4096

[routes.bench]
teacher = "openai:canned?base_url=http://127.0.0.1:{upstream}/v1&max_retries=0"

[routes.shadowed]
teacher = "openai:canned?base_url=http://127.0.0.1:{upstream}/v1&max_retries=0"
student = "openai:slow?base_url=http://127.0.0.1:{slow}/v1&max_retries=0"
stage = "shadow"
auto = false
''')


def litellm_config(tmp: Path, upstream: int) -> Path:
    path = tmp / "litellm.yaml"
    path.write_text(f"""model_list:
  - model_name: bench
    litellm_params:
      model: openai/canned
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: sk-canned
""")
    return path


def start_servers(tmp: Path, litellm: Path | None, servers: dict[str, Server]) -> dict[str, Target]:
    """Start every server into `servers` (the caller stops them, also when one fails to come up)."""
    ports = {name: free_port() for name in ("canned", "slow", "ours", "litellm")}
    canned = str(ROOT / "bench" / "support" / "canned.py")
    servers["canned"] = Server("canned upstream", [sys.executable, canned, str(ports["canned"])], tmp / "canned.log")
    servers["slow"] = Server("slow upstream", [sys.executable, canned, str(ports["slow"]), str(SLOW_STUDENT_S)],
                             tmp / "slow.log")
    our_config(tmp, ports["canned"], ports["slow"])
    servers["ours"] = Server("slmswap serve", [sys.executable, "-c", "from app.cli import main; main()", "serve",
                                               "--port", str(ports["ours"]), "--workers", "1"],
                             tmp / "ours.log", cwd=tmp,
                             # a key of the user's own must never travel, even to our loopback upstream
                             env={"PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-bench-canned"})
    if litellm is not None:
        env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        servers["litellm"] = Server("litellm", [str(litellm), "--config", str(litellm_config(tmp, ports["canned"])),
                                                "--port", str(ports["litellm"]), "--host", "127.0.0.1",
                                                "--num_workers", "1"], tmp / "litellm.log", cwd=tmp, env=env)
    servers["canned"].wait_ready(f"http://127.0.0.1:{ports['canned']}/", 60)
    servers["slow"].wait_ready(f"http://127.0.0.1:{ports['slow']}/", 60)
    servers["ours"].wait_ready(f"http://127.0.0.1:{ports['ours']}/healthz", 120)
    targets = {"direct": Target("direct", ports["canned"], body=BODY),
               "ours": Target("slm-swap", ports["ours"], body=BODY),
               "shadowed": Target("slm-swap shadow", ports["ours"], body={**BODY, "model": "shadowed"})}
    if litellm is not None:
        auth = {"authorization": f"Bearer {LITELLM_KEY}"}
        try:
            # LiteLLM imports a great deal before it listens; on a busy 2-core machine that takes a while.
            servers["litellm"].wait_ready(f"http://127.0.0.1:{ports['litellm']}/health/liveliness", 240, auth)
            targets["litellm"] = Target("LiteLLM", ports["litellm"], body=BODY, headers=auth)
        except RuntimeError as exc:
            print(f"LiteLLM did not start, measuring without it: {exc}")
            servers.pop("litellm").stop()
    return targets


def cpu_seconds(server: Server) -> float:
    """User + system CPU of the server's process group so far (its workers included), from /proc."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == server.proc.pid:  # field 5, the process group
            total += int(fields[11]) + int(fields[12])
    return total / tick


def shed_shadows(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(int(float(m)) for m in re.findall(r'^slmswap_shadow_shed_total\{[^}]*\} (\S+)', text, re.M))


# ---- measuring -------------------------------------------------------------------------------------------------

class Results:
    """Latencies per (target, concurrency), merged over rounds, and each server's CPU per request."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int], Run] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, key: str, run: Run, cpu_s: float | None) -> None:
        old = self.runs.get((key, run.concurrency))
        if old is None:
            self.runs[key, run.concurrency] = run
        else:
            old.latencies += run.latencies
            old.seconds += run.seconds
            for k, v in run.failures.items():
                old.failures[k] = old.failures.get(k, 0) + v
        if cpu_s is not None and run.latencies:
            self.cpu.setdefault(key, []).append(cpu_s / len(run.latencies) * 1e6)

    def added(self, key: str, level: int, q: float) -> float:
        return self.runs[key, level].pct(q) - self.runs["direct", level].pct(q)

    def sustained(self, key: str, levels: tuple[int, ...]) -> tuple[float, int | None]:
        """The best RPS among the concurrencies where the added p99 stays within the bound, and that concurrency."""
        ok = [(self.runs[key, c].rps, c) for c in levels if self.added(key, c, 99) <= P99_BOUND_MS]
        return max(ok) if ok else (0.0, None)


async def measure(targets: dict[str, Target], servers: dict[str, Server], keys: list[str], levels: tuple[int, ...],
                  rounds: int, seconds: float, results: Results) -> None:
    for level in levels:
        requests = max(400, 200 * level)
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order each round
                server = servers.get(_server_of(key))
                before = cpu_seconds(server) if server else None
                run = await drive(targets[key], level, requests, seconds)
                results.add(key, run, cpu_seconds(server) - before if server else None)
        line = "  ".join(f"{k} p50 {results.runs[k, level].pct(50):6.2f} p99 {results.runs[k, level].pct(99):7.2f} "
                         f"{results.runs[k, level].rps:6.0f}/s" for k in keys)
        print(f"  c={level:<4} {line}", flush=True)


def _server_of(key: str) -> str:
    return {"direct": "canned", "ours": "ours", "shadowed": "ours", "litellm": "litellm"}[key]


async def warm_up(targets: dict[str, Target], keys: list[str]) -> None:
    for key in keys:
        run = await drive(targets[key], 8, 400, 30)
        if not run.latencies:
            raise SystemExit(f"{targets[key].name} answered no request during warm-up: {run.failures}")


# ---- reporting -------------------------------------------------------------------------------------------------

def table(results: Results, keys: list[str], levels: tuple[int, ...], names: dict[str, str]) -> list[str]:
    rows = ["| | added p50 @1 | added p99 @1 | added p50 @32 | added p99 @32 | sustained RPS (p99 added ≤ 50 ms) "
            "| peak RPS | CPU per request | one-core capacity |", "|---|---|---|---|---|---|---|---|---|"]
    runs = results.runs
    rows.append(f"| direct (latency, not added) | {runs['direct', 1].pct(50):.2f} ms "
                f"| {runs['direct', 1].pct(99):.2f} ms "
                f"| {runs['direct', 32].pct(50):.2f} ms | {runs['direct', 32].pct(99):.2f} ms | "
                f"| {peak(results, 'direct', levels):,.0f} (generator + upstream) | {_cpu(results, 'direct')} | |")
    for key in keys:
        if key == "direct":
            continue
        rps, at = results.sustained(key, levels)
        sustained = f"**{rps:,.0f}** (concurrency {at})" if at else "none met the bound"
        capacity = capacity_of(results, key)
        rows.append(f"| {names[key]} | {results.added(key, 1, 50):.2f} ms | {results.added(key, 1, 99):.2f} ms "
                    f"| {results.added(key, 32, 50):.2f} ms | {results.added(key, 32, 99):.2f} ms | {sustained} "
                    f"| {peak(results, key, levels):,.0f} | {_cpu(results, key)} "
                    f"| {f'{capacity:,.0f} req/s' if capacity else 'n/a'} |")
    return rows


def peak(results: Results, key: str, levels: tuple[int, ...]) -> float:
    return max(results.runs[key, c].rps for c in levels)


def capacity_of(results: Results, key: str) -> float | None:
    """Requests per second one worker would answer with a whole core to itself: 1 / its CPU time per request."""
    values = sorted(results.cpu.get(key, []))
    return 1e6 / values[len(values) // 2] if values else None


def _cpu(results: Results, key: str) -> str:
    values = sorted(results.cpu.get(key, []))
    return f"{values[len(values) // 2]:,.0f} µs" if values else "n/a"


def shadow_rows(shadow: Results, shed: int) -> list[str]:
    rows = ["", "| shadow's cost on the teacher path (student 200 ms) | added p50, stage teacher | added p50, stage "
            "shadow | cost |", "|---|---|---|---|"]
    for level in (1, 32):
        teacher, shadowed = shadow.added("ours", level, 50), shadow.added("shadowed", level, 50)
        rows.append(f"| concurrency {level} | {teacher:.2f} ms | {shadowed:.2f} ms | **{shadowed - teacher:+.2f} ms** "
                    "|")
    answered = sum(len(shadow.runs["shadowed", c].latencies) for c in (1, 32))
    rows.append(f"\nCPU per request, stage shadow {_cpu(shadow, 'shadowed')} vs stage teacher {_cpu(shadow, 'ours')}; "
                f"shadow runs shed (over [rollout] shadow_concurrency): {shed} of {answered} shadow-stage requests")
    return rows


def ratios(main: Results, levels: tuple[int, ...]) -> str:
    """Ours over LiteLLM's: sustained RPS (when both met the bound), peak RPS, one-core capacity."""
    ours, theirs = main.sustained("ours", levels), main.sustained("litellm", levels)
    sustained = f"{ours[0] / theirs[0]:.2f}×" if ours[1] and theirs[1] else "n/a (one of them never met the bound)"
    cap_ours, cap_theirs = capacity_of(main, "ours"), capacity_of(main, "litellm")
    capacity = f"{cap_ours / cap_theirs:.2f}×" if cap_ours and cap_theirs else "n/a"
    return (f"ours / LiteLLM's: sustained RPS {sustained}, peak RPS "
            f"{peak(main, 'ours', levels) / peak(main, 'litellm', levels):.2f}×, one-core capacity {capacity} "
            "(target ≥ 4×)")


def failures(results: Results) -> str:
    bad = {f"{k}@{c}": run.failures for (k, c), run in results.runs.items() if run.failures}
    return f"failed requests: {bad}" if bad else "failed requests: none"


def reference_ms() -> float:
    """How fast this machine runs Python right now: the best of 5 runs of a fixed loop (1M additions), in ms.
    The same host has measured 2x apart on one day; absolute latencies compare only at a similar figure."""
    best = float("inf")
    for _ in range(5):
        start, x = time.perf_counter(), 0
        for i in range(1_000_000):
            x += i
        best = min(best, time.perf_counter() - start)
    return best * 1000


def conditions() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min), "
            f"Python reference loop {reference_ms():.0f} ms (1M additions, best of 5)")


async def bench(args: argparse.Namespace, targets: dict[str, Target], servers: dict[str, Server],
                names: dict[str, str], tmp: Path) -> None:
    keys = [k for k in ("direct", "ours", "litellm") if k in targets]
    levels = QUICK_LEVELS if args.quick else LEVELS
    seconds = 1.5 if args.quick else 3.0
    await warm_up(targets, keys + ["shadowed"])
    print(f"sweep: closed loop, {args.rounds} interleaved rounds per concurrency, ≤ {seconds:g} s per measurement "
          "(p50 / p99 ms, RPS)", flush=True)
    main = Results()
    await measure(targets, servers, keys, levels, args.rounds, seconds, main)
    print("shadow: teacher-stage route vs shadow-stage route (student waits 200 ms), same proxy", flush=True)
    shed_before = shed_shadows(targets["ours"].port)
    shadow = Results()
    await measure(targets, servers, ["direct", "ours", "shadowed"], (1, 32), args.rounds + 1, seconds, shadow)
    shed = shed_shadows(targets["ours"].port) - shed_before
    report(args, main, shadow, keys, levels, names, shed, captured_errors(tmp / "calls.db"))


def report(args, main: Results, shadow: Results, keys: list[str], levels: tuple[int, ...], names: dict[str, str],
           shed: int, errors: list[str]) -> None:
    print("\n" + "\n".join(table(main, keys, levels, names) + shadow_rows(shadow, shed)))
    print(failures(main))
    for line in errors:
        print(f"  captured: {line}")
    ours_p50 = main.added("ours", 1, 50)
    print(f"summary: slm-swap added p50 at concurrency 1 {ours_p50:.2f} ms (target ≤ 1 ms: "
          f"{'met' if ours_p50 <= 1 else 'missed'}); " + (ratios(main, levels) if "litellm" in keys else
                                                          "LiteLLM not measured"))
    print(f"conditions: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {conditions()}, "
          f"command: .venv/bin/python bench/proxy.py {' '.join(sys.argv[1:])}".rstrip())


def captured_errors(db: Path) -> list[str]:
    """Why our proxy's failed attempts failed, as its store recorded them (role, type, detail, count)."""
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT role, error_type, substr(error_detail, 1, 160), count(*) FROM calls "
                            "WHERE valid = 0 GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 5").fetchall()
    return [f"{n} × {role} {kind}: {detail}" for role, kind, detail, n in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer concurrencies, shorter measurements")
    parser.add_argument("--no-litellm", action="store_true", help="measure direct and slm-swap only")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per concurrency")
    args = parser.parse_args()
    loop = event_loop_policy()
    litellm = litellm_venv(args.no_litellm)
    names = {"ours": "slm-swap (capture on, SQLite)", "shadowed": "slm-swap shadow",
             "litellm": f"LiteLLM {litellm_version()}" if litellm else "LiteLLM"}
    print(f"load generator: one process, raw HTTP/1.1 keep-alive on {loop}; "
          f"{names['litellm'] if litellm else 'LiteLLM skipped'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        servers: dict[str, Server] = {}
        try:
            targets = start_servers(Path(tmp), litellm, servers)
            started = time.perf_counter()
            asyncio.run(bench(args, targets, servers, names, Path(tmp)))
            print(f"measured in {time.perf_counter() - started:.0f} s")
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
