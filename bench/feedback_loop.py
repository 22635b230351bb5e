"""The closed loop on the toy world: serve -> simulated feedback -> scheduled retrain -> evaluate.

    python bench/feedback_loop.py --rounds 3 --out FILE.json

Starts the embedded stack (SQLite, a real Celery worker on the filesystem
broker, gRPC, the HTTP feedback endpoint) on a fresh data directory, with
``history_limit=5`` (the evaluation's window) and keyword exploration on. Round
0 scores the preset as served (keywords only) on held-out users; each later
round lets the simulated audience (training/audience.py) answer through the real
API, then sends the retrain job (the one beat schedules) to the worker, waits
for its report and scores whatever is serving afterwards. Writes

    {"rounds": [{"round", "model_version", "joint", "oracle_joint", "content_fidelity", "n_feedback", ...}]}

and a PNG plot next to it. ``joint`` is `pigment eval`'s joint favourite-attribute
accuracy on ``--eval-samples`` test-users windows with sample seed
``--eval-seed`` (the promotion gate uses another seed); the oracle renders the
users' true favourites with the same renderer (the UNet is not retrained here,
so it is scored once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="toy", help="preset name or directory (needs the attribute probe)")
    p.add_argument("--data-dir", default=None, help="fresh state directory (default: a temporary one)")
    p.add_argument("--users", type=int, default=72, help="audience size (toy-world train users)")
    p.add_argument("--candidates", type=int, default=4, help="images shown per user per round")
    p.add_argument("--noise", type=float, default=0.1, help="probability of a random pick")
    p.add_argument("--explore", type=float, default=0.5, help="preference_explore_rate of the server")
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--gate-seed", type=int, default=1, help="retrain_eval_seed: the promotion gate's windows")
    p.add_argument("--max-pairs-per-user", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=None, help="Pigeon DPO steps per retrain")
    p.add_argument("--train-lr", type=float, default=None)
    p.add_argument("--retrain-timeout", type=float, default=1800.0, help="seconds to wait for one retrain")
    return p.parse_args(argv)


def evaluate_serving(preset_dir: Path, adapter: Path | None, n: int, seed: int, oracle: bool = False) -> dict:
    from pigment.training.eval import evaluate

    method = "pigeon_dpo" if adapter is not None else "pmg_keywords"
    methods = [method, "oracle"] if oracle else [method]
    report = evaluate(preset_dir, "test-users", methods, n, seed=seed,
                      adapters={"pigeon_dpo": str(adapter)} if adapter is not None else None)
    out = {"method": method, "joint": report["methods"][method]["preference_accuracy"]["joint"],
           "content_fidelity": report["methods"][method]["content_fidelity"],
           "preference_accuracy": report["methods"][method]["preference_accuracy"],
           "renderer_version": report["model_version"]}
    if oracle:
        out["oracle_joint"] = report["methods"]["oracle"]["preference_accuracy"]["joint"]
        out["oracle_content_fidelity"] = report["methods"]["oracle"]["content_fidelity"]
    return out


def wait_for_report(root: Path, known: set[str], timeout: float, worker) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(root.glob("*/report.json")):
            if path.parent.name not in known:
                return json.loads(path.read_text())
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.proc.returncode}); see {worker.log_path}")
        time.sleep(1.0)
    raise TimeoutError(f"no retrain report under {root} after {timeout}s; see {worker.log_path}")


def run(args) -> dict:
    import grpc
    import yaml
    from pigment.services.common.settings import Settings
    from pigment.services.registry import Registry
    from pigment.services.render.celery_app import RETRAIN_TASK
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade
    from pigment.training.audience import Audience, AudienceConfig

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="pigment-loop-"))
    overrides = {k: v for k, v in (("steps", args.train_steps), ("lr", args.train_lr)) if v is not None}
    config = None
    if overrides:
        config = data_dir / "retrain.yaml"
        data_dir.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(overrides))
    settings = Settings(data_dir=data_dir, preset=args.preset, history_limit=5, render_timeout_s=600,
                        preference_explore_rate=args.explore, render_batch_window_ms=30, render_max_batch=8,
                        retrain_eval_samples=args.eval_samples, retrain_eval_seed=args.gate_seed,
                        retrain_max_pairs_per_user=args.max_pairs_per_user, retrain_config=config)
    upgrade(settings.database_url)
    stack = Stack(settings)
    preset_dir = stack.preset_dir
    registry = Registry(stack.sessions)
    worker = Worker(settings).start()
    server, port = stack.server(port=0)
    server.start()
    http = stack.http_server(0).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    rounds, t_start = [], time.perf_counter()
    try:
        audience = Audience(channel, f"http://127.0.0.1:{http.port}", preset_dir,
                            AudienceConfig(n_users=args.users, candidates=args.candidates, noise=args.noise))
        print(f"[loop] ingested {audience.ingest()} items for {len(audience.users)} audience users", flush=True)
        t0 = time.perf_counter()
        score = evaluate_serving(preset_dir, None, args.eval_samples, args.eval_seed, oracle=True)
        oracle = {k: score[k] for k in ("oracle_joint", "oracle_content_fidelity")}
        rounds.append(entry(0, None, score, oracle, 0, None, time.perf_counter() - t0))
        print(f"[loop] round 0: {json.dumps(rounds[-1])}", flush=True)
        root = settings.data_dir / "retrain"
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            stats = audience.run_round(r - 1)
            print(f"[loop] round {r} audience: {json.dumps(stats)}", flush=True)
            known = {p.parent.name for p in root.glob("*/report.json")}
            stack.celery.send_task(RETRAIN_TASK, args=[settings.retrain_kind], queue=settings.retrain_queue)
            report = wait_for_report(root, known, args.retrain_timeout, worker)
            print(f"[loop] round {r} retrain: {report['status']}: {report['reason']}", flush=True)
            active = registry.active(settings.retrain_kind)
            previous = rounds[-1]
            if (active.version if active else None) == previous["model_version"]["adapter"]:
                score = {k: previous[k] for k in ("joint", "content_fidelity", "preference_accuracy", "method")}
                score["renderer_version"] = previous["model_version"]["renderer"]
            else:
                score = evaluate_serving(preset_dir, registry.verify(active), args.eval_samples, args.eval_seed)
            rounds.append(entry(r, active.version if active else None, score, oracle, stats["feedback"], report,
                                time.perf_counter() - t0, stats))
            print(f"[loop] round {r}: {json.dumps({k: v for k, v in rounds[-1].items() if k != 'audience'})}",
                  flush=True)
    finally:
        channel.close()
        http.stop()
        server.stop(grace=1).wait()
        worker.stop()
    return {"rounds": rounds, "target": target(rounds), "config": {k: v for k, v in vars(args).items()},
            "preset": str(preset_dir), "data_dir": str(data_dir), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
            "seconds": round(time.perf_counter() - t_start, 1)}


def entry(r: int, adapter: str | None, score: dict, oracle: dict, n_feedback: int, report: dict | None,
          seconds: float, audience: dict | None = None) -> dict:
    out = {"round": r, "model_version": {"adapter": adapter, "renderer": score.get("renderer_version")},
           "joint": score["joint"], "oracle_joint": oracle["oracle_joint"],
           "content_fidelity": score["content_fidelity"], "n_feedback": n_feedback,
           "preference_accuracy": score["preference_accuracy"], "method": score["method"],
           "seconds": round(seconds, 1)}
    if report is not None:
        out["retrain"] = {k: report.get(k) for k in ("status", "reason", "version", "n_feedback", "n_pairs",
                                                     "seconds")}
        out["retrain"]["max_pairs_per_user"] = max((report.get("pairs_per_user") or {}).values(), default=0)
    if audience is not None:
        out["audience"] = audience
    return out


def target(rounds: list[dict]) -> dict:
    """The issue's target: joint +min(0.05, half the gap to the oracle), content fidelity within 0.05."""
    first, last = rounds[0], rounds[-1]
    need = min(0.05, (first["oracle_joint"] - first["joint"]) / 2)
    gain = last["joint"] - first["joint"]
    drift = abs(last["content_fidelity"] - first["content_fidelity"])
    return {"joint_gain": round(gain, 4), "needed": round(need, 4), "content_fidelity_change": round(drift, 4),
            "met": bool(gain >= need and drift <= 0.05)}


def plot(rounds: list[dict], path: Path) -> None:
    """joint, oracle_joint and content_fidelity per round, drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [r["round"] for r in rounds]
    x_of = lambda x: pad + (w - 2 * pad) * (x - xs[0]) / max(1, xs[-1] - xs[0])
    y_of = lambda y: h - pad - (h - 2 * pad) * y
    d.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([(pad - 4, y_of(v)), (w - pad, y_of(v))], fill=(225, 225, 225))
        d.text((pad - 34, y_of(v) - 6), f"{v:.2f}", fill="black")
    for x in xs:
        d.text((x_of(x) - 3, h - pad + 8), str(x), fill="black")
    d.text((w // 2 - 20, h - pad + 26), "round", fill="black")
    series = (("joint", (200, 40, 40)), ("oracle_joint", (40, 80, 220)), ("content_fidelity", (40, 150, 60)))
    for n, (key, colour) in enumerate(series):
        pts = [(x_of(r["round"]), y_of(r[key])) for r in rounds]
        d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([(pad + 10 + 170 * n, 20), (pad + 30 + 170 * n, 20)], fill=colour, width=3)
        d.text((pad + 35 + 170 * n, 14), key, fill="black")
    for r in rounds:  # what the retrain job decided after that round's feedback
        if r.get("retrain"):
            d.text((x_of(r["round"]) - 24, h - pad - 14), str(r["retrain"]["status"]), fill=(90, 90, 90))
    d.text((pad, 34), "feedback loop, toy world: held-out users (pigment eval)", fill="black")
    img.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result["rounds"], out.with_suffix(".png"))
    print(json.dumps(result["target"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
