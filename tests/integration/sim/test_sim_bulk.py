"""The bulk batch entry point (`python -m jobs.bulk_simulate`) with an in-process worker."""
from __future__ import annotations

import asyncio
import json

import pytest

from jobs import bulk_simulate
from services.simulation_runner import JobProcessor
from storage.queue import ReliableQueue
from tests.support.actors import make_user


async def serve_queue(ctx, settings, stop: asyncio.Event, concurrency: int = 2) -> int:
    """A simulator worker in the test's loop until `stop` is set; returns jobs processed."""
    queue = ReliableQueue.from_settings(ctx.redis, settings)
    processor = JobProcessor(ctx.db, queue, settings, "bulk-worker", concurrency=concurrency)
    await queue.register("bulk-worker")
    processed = 0
    try:
        while not stop.is_set():
            await queue.promote_due()
            claimed = await queue.claim("bulk-worker", timeout=0.2)
            if claimed is not None:
                await processor.process(claimed)
                processed += 1
    finally:
        processor.close()
    return processed


async def run_batch(ctx, settings, argv: list[str]) -> tuple[int, int]:
    stop = asyncio.Event()
    worker = asyncio.create_task(serve_queue(ctx, settings, stop))
    try:
        code = await asyncio.to_thread(bulk_simulate.main, argv, settings)
    finally:
        stop.set()
    return code, await worker


async def test_scripted_batch_reports_without_invented_scores(profile_ctx, tmp_path):
    users = [str(await make_user(profile_ctx.db)) for _ in range(2)]
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(users) + "\n")
    out = tmp_path / "report"
    code, processed = await run_batch(profile_ctx, profile_ctx.settings, [
        "--users-file", str(users_file), "--templates", "health_assessment,belief_exploration",
        "-k", "2", "--max-turns", "2", "--out", str(out), "--poll", "0.2", "--no-progress",
        "--batch-id", "scripted-1"])
    assert code == 0 and processed == 8
    report = json.loads((out / "report.json").read_text())
    assert report["totals"] == {"jobs": 8, "succeeded": 8, "dead": 0, "cancelled": 0,
                                "unfinished": 0, "success_rate": 1.0}
    assert report["generated_by"] == ["scripted"] and report["metrics_computed"] is False
    assert report["pass_k"]["rate"] is None and report["pass_k"]["pairs"] == 4
    assert all(p["note"].startswith("metrics not computed") for p in report["pass_k"]["by_pair"])
    assert report["per_template"]["health_assessment"]["metrics"]["turn_relevancy"]["mean"] is None
    markdown = (out / "report.md").read_text()
    assert "Metrics were **not computed**" in markdown
    assert (out / "durations.png").stat().st_size > 0
    assert not list(out.glob("metrics_*.png"))  # nothing to plot: no scores were invented

    # The same batch id resumes: nothing is enqueued again.
    code, processed = await run_batch(profile_ctx, profile_ctx.settings, [
        "--user-ids", ",".join(users), "--templates", "health_assessment,belief_exploration",
        "-k", "2", "--max-turns", "2", "--out", str(tmp_path / "again"), "--poll", "0.2",
        "--no-progress", "--batch-id", "scripted-1"])
    assert code == 0 and processed == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert sorted(j["job_id"] for j in again["jobs"]) == sorted(j["job_id"] for j in report["jobs"])


async def test_deepeval_batch_with_charts_and_pass_k(profile_ctx, llm_settings, tmp_path):
    users = [str(await make_user(profile_ctx.db)) for _ in range(2)]
    out = tmp_path / "report"
    code, processed = await run_batch(profile_ctx, llm_settings, [
        "--all-users", "--templates", "default,protocol_discussion", "-k", "2",
        "--threshold", "0.5", "--max-turns", "3", "--out", str(out), "--poll", "0.2",
        "--no-progress"])
    assert code == 0 and processed == 8
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["users"] == 2
    assert report["totals"]["success_rate"] == 1.0 and report["metrics_computed"] is True
    for template in ("health_assessment", "protocol_discussion"):
        metrics = report["per_template"][template]["metrics"]
        assert set(metrics) == {"conversation_completeness", "turn_relevancy"}
        assert all(m["count"] == 4 and 0 <= m["mean"] <= 1 for m in metrics.values())
        assert (out / f"metrics_{template}.png").stat().st_size > 1000
    assert report["pass_k"]["judged"] == 4
    assert report["pass_k"]["rate"] == pytest.approx(
        sum(p["passed"] for p in report["pass_k"]["by_pair"]) / 4)
    assert report["tokens"]["total"] > 0 and report["cost_usd"] is None
    assert report["durations"]["wall_seconds"]["count"] == 8
    markdown = (out / "report.md").read_text()
    assert "![metrics_health_assessment.png](metrics_health_assessment.png)" in markdown
    assert "pass^k" in markdown and "unknown (no prices configured)" in markdown


async def test_bad_input_is_a_usage_error(profile_ctx, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bulk_simulate.main(["--out", str(tmp_path)], profile_ctx.settings)
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        await asyncio.to_thread(bulk_simulate.main, ["--user-ids", "not-a-uuid", "--out", str(tmp_path)],
                                profile_ctx.settings)
    code = await asyncio.to_thread(bulk_simulate.main, [
        "--all-users", "--templates", "nope", "--out", str(tmp_path)], profile_ctx.settings)
    assert code == 1 and "Unknown simulation template" in capsys.readouterr().err
