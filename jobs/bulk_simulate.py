"""Bulk simulation batches (SPEC §4.9, §7): enqueue simulations for many users, wait, report.

Run against a cluster (the code must be importable there, and the job needs the same
database and Redis settings as the apps):

    ray job submit --address http://127.0.0.1:8265 \\
        --runtime-env-json '{"env_vars": {"SMA_DATABASE_URL": "...", "SMA_REDIS_URL": "..."}}' \\
        -- python -m jobs.bulk_simulate --all-users --templates health_assessment,protocol_discussion \\
           -k 3 --threshold 0.7 --out reports/nightly

or directly: `python -m jobs.bulk_simulate --user-ids <id>,<id> -k 2 --out /tmp/report`.

Jobs go through the same service as `POST /simulateConversation`, with idempotency keys
`bulk:<batch-id>:<template>:<repeat>`: re-running with the same `--batch-id` resumes a batch
instead of enqueuing it twice. The report (`report.json`, `report.md` and PNG charts in
`--out`) gives the success rate, metric means and distributions per template, pass^k per
(user, template) at `--threshold`, durations, tokens and cost. Scores are only ever those
DeepEval computed: scripted runs (no LLM configured) report metrics as not computed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")

from sqlalchemy import select  # noqa: E402

from core.settings import Settings, get_settings  # noqa: E402
from services import simulation_jobs  # noqa: E402
from services.simulation_templates import (DEFAULT_TEMPLATE, METRIC_NAMES,  # noqa: E402
                                           SimulationConfig, resolve_template)
from storage.db import Database  # noqa: E402
from storage.models import SimulationJob, User  # noqa: E402
from storage.queue import ReliableQueue  # noqa: E402
from storage.redis import make_redis  # noqa: E402

FINISHED = set(simulation_jobs.TERMINAL_STATUSES)


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bulk_simulate",
        description="Enqueue simulated conversations for many users, wait, and write a report.")
    users = parser.add_argument_group("users (at least one)")
    users.add_argument("--user-ids", type=_csv, default=[], metavar="ID,ID",
                       help="comma-separated user ids (repeatable)", action="extend")
    users.add_argument("--users-file", type=Path,
                       help="a file of user ids: one per line, or a JSON list")
    users.add_argument("--all-users", action="store_true", help="every user in the database")
    parser.add_argument("--templates", type=_csv, default=[DEFAULT_TEMPLATE], metavar="NAME,NAME",
                        help=f"templates (default {DEFAULT_TEMPLATE})")
    parser.add_argument("-k", "--repeats", type=int, default=3,
                        help="runs per (user, template); pass^k needs all k to pass (default 3)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="a run passes when every metric scores at least this (default 0.5)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    parser.add_argument("--max-turns", type=int, default=None, help="simulated user turns per run")
    parser.add_argument("--metrics", type=_csv, default=None, metavar="NAME,NAME",
                        help=f"metrics (default completeness and turn relevancy; any of {', '.join(METRIC_NAMES)})")
    parser.add_argument("--coach", choices=("llm", "epistemic"), default=None)
    parser.add_argument("--batch-id", default=None,
                        help="names the batch; the same id resumes instead of enqueuing again")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds to wait for the jobs (default 3600)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status checks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@dataclass(frozen=True)
class PlannedJob:
    job_id: uuid.UUID
    user_id: uuid.UUID
    template: str
    repeat: int


class InputError(Exception):
    pass


def _config(args: argparse.Namespace) -> SimulationConfig | None:
    fields: dict[str, Any] = {}
    if args.max_turns is not None:
        fields["max_turns"] = args.max_turns
    if args.metrics:
        fields["metrics"] = args.metrics
    if args.coach:
        fields["coach"] = args.coach
    try:
        return SimulationConfig(**fields) if fields else None
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _parse_ids(values: list[str]) -> list[uuid.UUID]:
    ids = []
    for value in values:
        try:
            ids.append(uuid.UUID(str(value).strip()))
        except ValueError:
            raise InputError(f"not a user id: {value!r}") from None
    return ids


def _read_users_file(path: Path) -> list[str]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return [str(v) for v in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


async def collect_users(db: Database, args: argparse.Namespace) -> list[uuid.UUID]:
    wanted = _parse_ids(args.user_ids + (_read_users_file(args.users_file) if args.users_file else []))
    async with db.transaction() as session:
        if args.all_users:
            wanted += list(await session.scalars(select(User.id).order_by(User.created_at, User.id)))
        unique = list(dict.fromkeys(wanted))
        if unique:
            known = set(await session.scalars(select(User.id).where(User.id.in_(unique))))
            missing = [str(u) for u in unique if u not in known]
            if missing:
                raise InputError(f"unknown user(s): {', '.join(missing[:10])}")
    return unique


async def enqueue(db: Database, queue: ReliableQueue, settings: Settings, users: list[uuid.UUID],
                  templates: list[str], repeats: int, batch_id: str,
                  config: SimulationConfig | None) -> list[PlannedJob]:
    planned = []
    for user_id in users:
        for template in templates:
            for repeat in range(1, repeats + 1):
                submitted = await simulation_jobs.submit_job(
                    db, queue, None, user_id=user_id, template=template, config=config,
                    idempotency_key=f"bulk:{batch_id}:{template}:{repeat}",
                    max_attempts=settings.sim_max_attempts)
                planned.append(PlannedJob(submitted.job.id, user_id, template, repeat))
    return planned


async def _snapshot(db: Database, ids: list[uuid.UUID]) -> dict[uuid.UUID, SimulationJob]:
    rows: dict[uuid.UUID, SimulationJob] = {}
    async with db.transaction() as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for row in await session.scalars(select(SimulationJob).where(SimulationJob.id.in_(chunk))
                                             .execution_options(populate_existing=True)):
                rows[row.id] = row
    return rows


async def wait_for(db: Database, planned: list[PlannedJob], *, timeout: float, poll: float,
                   progress: bool) -> dict[uuid.UUID, SimulationJob]:
    from tqdm import tqdm

    ids = [p.job_id for p in planned]
    deadline = time.monotonic() + timeout
    with tqdm(total=len(ids), unit="job", desc="simulations", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        while True:
            rows = await _snapshot(db, ids)
            statuses = [rows[i].status if i in rows else "deleted" for i in ids]
            done = sum(1 for s in statuses if s in FINISHED or s == "deleted")
            bar.update(done - bar.n)
            bar.set_postfix(ok=statuses.count("succeeded"), dead=statuses.count("dead"),
                            running=statuses.count("running"), refresh=False)
            if done == len(ids) or time.monotonic() >= deadline:
                return rows
            await asyncio.sleep(poll)


# --- the report -----------------------------------------------------------------------------

def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "mean": None, "min": None, "p50": None, "p90": None, "max": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"count": len(values), "mean": round(statistics.fmean(values), 4),
            "min": round(ordered[0], 4), "p50": round(pct(0.5), 4), "p90": round(pct(0.9), 4),
            "max": round(ordered[-1], 4)}


def _run_passes(job: dict[str, Any], threshold: float) -> bool | None:
    """True/False for a finished run; None when its metrics were not computed or it has not
    finished."""
    if job["status"] != "succeeded":
        return False if job["status"] in FINISHED else None
    scores = job["scores"]
    if not job["metrics_computed"] or not scores:
        return None
    return all(s is not None and s >= threshold for s in scores.values())


def build_report(planned: list[PlannedJob], rows: dict[uuid.UUID, SimulationJob], *,
                 batch_id: str, threshold: float, parameters: dict[str, Any],
                 started_at: datetime, finished_at: datetime) -> dict[str, Any]:
    jobs = []
    for p in planned:
        row = rows.get(p.job_id)
        summary = (row.metrics if row is not None else None) or {}
        wall = (row.finished_at - row.started_at).total_seconds() \
            if row is not None and row.finished_at and row.started_at else None
        jobs.append({
            "job_id": str(p.job_id), "user_id": str(p.user_id), "template": p.template,
            "repeat": p.repeat, "status": row.status if row is not None else "deleted",
            "attempts": row.attempts if row is not None else 0,
            "conversation_id": str(row.conversation_id) if row is not None and row.conversation_id else None,
            "last_error": row.last_error if row is not None else "job row deleted",
            "generated_by": summary.get("generated_by"),
            "metrics_computed": bool(summary.get("computed")),
            "scores": summary.get("scores") or {},
            "simulation_seconds": summary.get("duration_seconds"), "wall_seconds": wall,
            "tokens": summary.get("tokens") or {"prompt": 0, "completion": 0, "total": 0},
            "cost_usd": summary.get("cost_usd")})
    for job in jobs:
        job["passed"] = _run_passes(job, threshold)

    def counts(subset: list[dict]) -> dict[str, Any]:
        by = {s: sum(1 for j in subset if j["status"] == s)
              for s in ("succeeded", "dead", "cancelled")}
        unfinished = sum(1 for j in subset if j["status"] not in FINISHED)
        return {"jobs": len(subset), **by, "unfinished": unfinished,
                "success_rate": round(by["succeeded"] / len(subset), 4) if subset else None}

    pairs: dict[tuple[str, str], list[dict]] = {}
    for job in jobs:
        pairs.setdefault((job["user_id"], job["template"]), []).append(job)
    pass_k = []
    for (user_id, template), runs in pairs.items():
        verdicts = [r["passed"] for r in runs]
        if any(v is False for v in verdicts):
            passed, note = False, "at least one run failed or scored below the threshold"
        elif all(v is True for v in verdicts):
            passed, note = True, "all runs passed"
        elif any(r["status"] not in FINISHED for r in runs):
            passed, note = None, "not all runs finished"
        else:
            passed, note = None, "metrics not computed (no LLM configured)"
        pass_k.append({"user_id": user_id, "template": template, "k": len(runs),
                       "passed": passed, "note": note,
                       "min_scores": [min(r["scores"].values()) if r["metrics_computed"] and r["scores"]
                                      else None for r in runs]})

    per_template = {}
    for template in dict.fromkeys(j["template"] for j in jobs):
        subset = [j for j in jobs if j["template"] == template]
        names = sorted({n for j in subset for n in j["scores"]})
        metrics = {}
        for name in names:
            values = [j["scores"][name] for j in subset
                      if j["metrics_computed"] and j["scores"].get(name) is not None]
            stats = _stats(values)
            stats["pass_rate"] = (round(sum(v >= threshold for v in values) / len(values), 4)
                                  if values else None)
            metrics[name] = stats
        judged = [p for p in pass_k if p["template"] == template and p["passed"] is not None]
        per_template[template] = {
            **counts(subset), "metrics": metrics,
            "pass_k": {"pairs": sum(1 for p in pass_k if p["template"] == template),
                       "judged": len(judged), "passed": sum(1 for p in judged if p["passed"]),
                       "rate": round(sum(1 for p in judged if p["passed"]) / len(judged), 4)
                       if judged else None}}

    succeeded = [j for j in jobs if j["status"] == "succeeded"]
    costs = [j["cost_usd"] for j in succeeded if j["cost_usd"] is not None]
    judged_pairs = [p for p in pass_k if p["passed"] is not None]
    return {
        "batch_id": batch_id, "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "elapsed_seconds": round((finished_at - started_at).total_seconds(), 3),
        "parameters": {**parameters, "threshold": threshold},
        "generated_by": sorted({j["generated_by"] for j in succeeded if j["generated_by"]}),
        "metrics_computed": any(j["metrics_computed"] for j in jobs),
        "totals": counts(jobs),
        "pass_k": {"k": parameters["repeats"], "threshold": threshold, "pairs": len(pass_k),
                   "judged": len(judged_pairs),
                   "passed": sum(1 for p in judged_pairs if p["passed"]),
                   "rate": round(sum(1 for p in judged_pairs if p["passed"]) / len(judged_pairs), 4)
                   if judged_pairs else None, "by_pair": pass_k},
        "per_template": per_template,
        "durations": {"simulation_seconds": _stats([j["simulation_seconds"] for j in succeeded
                                                    if j["simulation_seconds"] is not None]),
                      "wall_seconds": _stats([j["wall_seconds"] for j in succeeded
                                              if j["wall_seconds"] is not None])},
        "tokens": {k: sum(j["tokens"].get(k, 0) for j in succeeded)
                   for k in ("prompt", "completion", "total")},
        "cost_usd": round(sum(costs), 6) if costs else None,
        "jobs": jobs,
    }


def write_charts(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    threshold = report["parameters"]["threshold"]
    for template, data in report["per_template"].items():
        names = [n for n, s in data["metrics"].items() if s["count"]]
        if not names:
            continue
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            values = [j["scores"][name] for j in report["jobs"] if j["template"] == template
                      and j["metrics_computed"] and j["scores"].get(name) is not None]
            ax.hist(values, bins=[i / 10 for i in range(11)], color="#4c72b0", edgecolor="white")
            ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
            ax.set_title(f"{name}\nmean {statistics.fmean(values):.2f} (n={len(values)})", fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_xlabel("score")
            ax.set_ylabel("runs")
            ax.legend(fontsize=7)
        fig.suptitle(f"Metric distributions: {template}")
        fig.tight_layout()
        name = f"metrics_{template}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        charts.append(name)
    durations = [j["wall_seconds"] for j in report["jobs"] if j["wall_seconds"] is not None]
    if durations:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(durations, bins=min(20, max(5, len(durations) // 2)), color="#55a868",
                edgecolor="white")
        ax.set_title("Job duration (started → finished)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("jobs")
        fig.tight_layout()
        fig.savefig(out / "durations.png", dpi=100)
        plt.close(fig)
        charts.append("durations.png")
    return charts


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any], charts: list[str]) -> str:
    t, p = report["totals"], report["parameters"]
    lines = [f"# Simulation batch `{report['batch_id']}`", "",
             f"{report['started_at']} → {report['finished_at']} ({report['elapsed_seconds']:.1f} s). "
             f"Users: {p['users']}, templates: {', '.join(p['templates'])}, k = {p['repeats']}, "
             f"threshold {p['threshold']:g}. Generated by: {', '.join(report['generated_by']) or 'n/a'}.",
             ""]
    if not report["metrics_computed"]:
        lines += ["> Metrics were **not computed**: no LLM endpoint is configured, so the scripted "
                  "generator wrote the conversations and there was no judge. pass^k is n/a.", ""]
    lines += ["## Summary", "", "| jobs | succeeded | dead | cancelled | unfinished | success rate | pass^k |",
              "|---:|---:|---:|---:|---:|---:|---:|",
              f"| {t['jobs']} | {t['succeeded']} | {t['dead']} | {t['cancelled']} | {t['unfinished']} "
              f"| {_fmt(t['success_rate'])} | {_fmt(report['pass_k']['rate'])} "
              f"({report['pass_k']['passed']}/{report['pass_k']['judged']}) |", ""]
    lines += ["## Per template", "",
              "| template | jobs | success rate | metric | mean | p50 | min | pass rate | pass^k |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for template, data in report["per_template"].items():
        metrics = data["metrics"] or {"(none)": {"mean": None, "p50": None, "min": None, "pass_rate": None}}
        for i, (name, s) in enumerate(metrics.items()):
            head = (f"| {template} | {data['jobs']} | {_fmt(data['success_rate'])} " if i == 0
                    else "| | | ")
            pk = data["pass_k"]
            tail = f"{_fmt(pk['rate'])} ({pk['passed']}/{pk['judged']})" if i == 0 else ""
            lines.append(f"{head}| {name} | {_fmt(s['mean'])} | {_fmt(s['p50'])} | {_fmt(s['min'])} "
                         f"| {_fmt(s['pass_rate'])} | {tail} |")
    d = report["durations"]["wall_seconds"]
    lines += ["", "## Durations, tokens and cost", "",
              f"- Job duration (s): mean {_fmt(d['mean'], 2)}, p50 {_fmt(d['p50'], 2)}, "
              f"p90 {_fmt(d['p90'], 2)}, max {_fmt(d['max'], 2)} (n={d['count']})",
              f"- Tokens: {report['tokens']['total']} (prompt {report['tokens']['prompt']}, "
              f"completion {report['tokens']['completion']})",
              f"- Cost: {'$' + format(report['cost_usd'], '.4f') if report['cost_usd'] is not None else 'unknown (no prices configured)'}",
              ""]
    lines += ["## pass^k by user and template", "", "| user | template | k | passed | note |",
              "|---|---|---:|---|---|"]
    for pair in report["pass_k"]["by_pair"][:200]:
        lines.append(f"| `{pair['user_id']}` | {pair['template']} | {pair['k']} "
                     f"| {_fmt(pair['passed'])} | {pair['note']} |")
    failed = [j for j in report["jobs"] if j["status"] in ("dead", "cancelled") or j["status"] not in FINISHED]
    if failed:
        lines += ["", "## Jobs that did not succeed", "", "| job | template | status | attempts | error |",
                  "|---|---|---|---:|---|"]
        for job in failed[:50]:
            error = (job["last_error"] or "").replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| `{job['job_id']}` | {job['template']} | {job['status']} | {job['attempts']} | {error} |")
    if charts:
        lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(report, out)
    report["charts"] = charts
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(render_markdown(report, charts))
    return [out / "report.json", out / "report.md", *(out / c for c in charts)]


async def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    templates = [resolve_template(t).name for t in args.templates]
    if args.repeats < 1:
        raise InputError("-k must be at least 1")
    config = _config(args)
    db = Database(settings.resolved_database_url())
    redis = make_redis(settings.redis_url)
    try:
        users = await collect_users(db, args)
        if not users:
            raise InputError("no users: give --user-ids, --users-file or --all-users")
        batch_id = args.batch_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
        started = datetime.now(timezone.utc)
        queue = ReliableQueue.from_settings(redis, settings)
        planned = await enqueue(db, queue, settings, users, templates, args.repeats, batch_id, config)
        print(f"batch {batch_id}: {len(planned)} job(s) for {len(users)} user(s) and "
              f"{len(templates)} template(s)", file=sys.stderr, flush=True)
        rows = await wait_for(db, planned, timeout=args.timeout, poll=args.poll,
                              progress=not args.no_progress)
        report = build_report(planned, rows, batch_id=batch_id, threshold=args.threshold,
                              parameters={"users": len(users), "templates": templates,
                                          "repeats": args.repeats,
                                          "config": config.model_dump(mode="json") if config else None},
                              started_at=started, finished_at=datetime.now(timezone.utc))
        paths = write_report(report, args.out)
    finally:
        await redis.aclose()
        await db.dispose()
    totals = report["totals"]
    print(f"success rate {_fmt(totals['success_rate'])} ({totals['succeeded']}/{totals['jobs']}), "
          f"pass^{args.repeats} {_fmt(report['pass_k']['rate'])}; report: "
          f"{', '.join(str(p) for p in paths[:2])}", flush=True)
    return 3 if totals["unfinished"] else 0


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.user_ids or args.users_file or args.all_users):
        parser.error("give --user-ids, --users-file or --all-users")
    try:
        return asyncio.run(run(args, settings))
    except InputError as exc:
        parser.error(str(exc))
    except Exception as exc:  # AppError from the services: a readable line, not a traceback
        message = getattr(exc, "message", None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
