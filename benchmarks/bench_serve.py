"""`langsam serve` throughput: 8 concurrent clients vs the same requests sent one at a time.

    python benchmarks/bench_serve.py [--workload predict|segment] [--requests 96] [--rounds 3]
                                     [--clients 8] [--threads N] [--sam-type tiny|vit_b]
                                     [--fusion on|off|both]

Starts a real server on 127.0.0.1 (a subprocess; random weights in the real checkpoint formats:
the tiny test SAM, whose decoder is full size, or a full-size vit_b, and the tiny Grounding
DINO), then alternates rounds of sequential and concurrent clients after a warm-up. Each round
sends the same requests:

* predict: clicks on an image embedded once with /v1/images (the interactive path: one decoder
  call per request);
* segment: /v1/segment of one photo with two queries (detector + decoder; the image embedding
  is cached after the first request).

Prints requests per second, p50 / p99 latency of each mode and the median ratio of concurrent to
sequential throughput (target >= 1.3x on CPU).

--fusion: the server's `fuse_decoder` (the /v1/predict jobs of a batch share decoder calls).
`both` starts two servers, fused and unfused, and alternates their rounds (sequential and
concurrent of one, then of the other), so that both see the same machine load; it also prints
the fused / unfused ratio of concurrent throughput. /v1/segment is not fused (the setting does
nothing there).

    python benchmarks/bench_serve.py --soak [--requests 2000] [--clients 16] [--rounds 5]

The soak instead: the load test's micro server (tests/test_serve.py) and its mixed requests
(`test_serve_support.soak`: clicks, uploads, /v1/segment, /v1/auto-masks, corrupt uploads) from 16
clients, in rounds; prints the statuses, the unexpected errors (target 0), the server's memory
after each round (target: flat after the first, the warm-up) and the image store's size.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(config: dict, log_path: Path):
    import httpx

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, str(TESTS / "test_serve_support.py"),
                                json.dumps({**config, "port": port})], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("server did not start")


def stop_server(process) -> None:
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def tree_rss(process) -> dict[str, int]:
    """Resident memory of the server's processes, bytes, by role."""
    import psutil

    root = psutil.Process(process.pid)
    memory: dict[str, int] = {}
    for index, member in enumerate([root, *root.children(recursive=True)]):
        try:
            command = " ".join(member.cmdline())
            role = ("main" if index == 0 else "tracker" if "resource_tracker" in command
                    else "spawned" if "spawn_main" in command else "forked")
            memory[f"{role}-{member.pid}"] = member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return memory


def run_soak(args) -> None:
    from sam_factory import real_photo
    from test_serve_support import soak

    import numpy as np

    config = {"pipeline_factory": "test_serve_support:make_micro_pipeline", "models": {"device": "cpu"},
              "max_queue": 64, "max_batch_size": 8, "max_images": 32, "workers": 2, "torch_threads": 1,
              "encoder_batch_size": 4, "timeout": 600}
    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_soak_"))
    process, url = start_server(config, workdir / "server.log")
    half = np.ascontiguousarray(real_photo("chelsea")[::2, ::2])
    images = [half, np.ascontiguousarray(half[:, ::-1]), np.ascontiguousarray(half[::-1]),
              np.ascontiguousarray(half[20:130, 25:200])]
    rounds: list[dict[str, int]] = []
    try:
        report = soak(url, images, requests=args.requests, clients=args.clients, phases=args.rounds,
                      rss=lambda: rounds.append(tree_rss(process)) or sum(rounds[-1].values()))
    finally:
        stop_server(process)
    print(f"soak: {report.requests} requests from {args.clients} clients in {args.rounds} rounds, "
          f"{report.seconds:.1f} s ({report.requests / report.seconds:.1f} req/s), micro server, 3 workers")
    for kind, counter in report.statuses.items():
        print(f"  {kind:>10}: {dict(sorted(counter.items()))}")
    print(f"unexpected errors: {len(report.unexpected)} (target 0) {report.unexpected[:3]}")
    print("server memory after each round (MiB; the first is the warm-up): "
          + ", ".join(f"{value / 2**20:.0f}" for value in report.rss)
          + f"; after the warm-up: at the end {report.growth / 2**20:+.1f} MiB, largest {report.largest_growth / 2**20:+.1f} MiB")
    for name in rounds[0]:
        print(f"  {name:>16}: " + ", ".join(f"{memory.get(name, 0) / 2**20:.0f}" for memory in rounds))
    print(f"image store: {report.stats['images_stored']} stored, configured {report.models['limits']['max_images']}; "
          f"worker batches {report.stats['batches']} for {report.stats['requests']} requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["predict", "segment"], default="predict")
    parser.add_argument("--requests", type=int, default=96, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server's worker")
    parser.add_argument("--sam-type", choices=["micro", "tiny", "vit_b"], default="tiny",
                        help="micro: the load test's micro pipeline (a 32-wide decoder and fixed boxes, so the "
                             "server's own costs dominate); tiny: the test SAM (full-size decoder) and the tiny "
                             "Grounding DINO; vit_b: a full-size random vit_b")
    parser.add_argument("--workers", type=int, default=1, help="server workers for /v1/segment")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--fusion", choices=["on", "off", "both"], default="both",
                        help="fused /v1/predict decoder calls (ServeConfig.fuse_decoder); both: two servers, "
                             "rounds alternated (default)")
    parser.add_argument("--soak", action="store_true", help="the soak instead (2,000 mixed requests by default)")
    args = parser.parse_args()
    if args.soak:
        if args.requests == parser.get_default("requests"):
            args.requests = 2000
        if args.rounds == parser.get_default("rounds"):
            args.rounds = 5
        if args.clients == parser.get_default("clients"):
            args.clients = 16
        run_soak(args)
        return

    import httpx
    import numpy as np
    from PIL import Image

    from sam import build_sam, save_checkpoint
    from sam_factory import randomize_parameters, real_photo, save_tiny_sam_checkpoint
    from tiny_gdino import save_tiny_grounding_dino

    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    checkpoint = workdir / "sam.pth"
    config = {"max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout, "max_queue": 256,
              "timeout": 600, "torch_threads": args.threads, "workers": args.workers}
    if args.sam_type == "micro":
        config.update(pipeline_factory="test_serve_support:make_micro_pipeline", models={"device": "cpu"})
    else:
        if args.sam_type == "tiny":
            save_tiny_sam_checkpoint(checkpoint)
        else:
            save_checkpoint(randomize_parameters(build_sam("vit_b"), seed=0), checkpoint)
        gdino = save_tiny_grounding_dino(workdir / "gdino", logit_scale=0.1, num_queries=8)
        config["models"] = {"sam_type": "auto", "sam_checkpoint": str(checkpoint), "detector": str(gdino),
                            "device": "cpu"}
    photo = real_photo("chelsea")
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    png = buffer.getvalue()
    height, width = photo.shape[:2]
    rng = np.random.default_rng(0)
    clicks = [[float(rng.uniform(0, width)), float(rng.uniform(0, height))] for _ in range(args.requests)]
    body = {"image": base64.b64encode(png).decode(), "text": ["a cat", "a remote control"], "box_threshold": 0.6}

    fusions = ["on", "off"] if args.fusion == "both" else [args.fusion]
    servers: dict[str, tuple] = {}  # fusion -> (process, url, image_id)
    try:
        for fusion in fusions:
            process, url = start_server({**config, "fuse_decoder": fusion == "on"}, workdir / f"server-{fusion}.log")
            with httpx.Client(base_url=url, timeout=600) as client:
                image_id = client.post("/v1/images", files={"image": ("c.png", png, "image/png")}).json()["image_id"]
            servers[fusion] = (process, url, image_id)

        def one_request(client, image_id: str, index: int) -> float:
            start = time.perf_counter()
            if args.workload == "predict":
                response = client.post("/v1/predict", json={"image_id": image_id, "points": [clicks[index]],
                                                            "labels": [1]})
            else:
                response = client.post("/v1/segment", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"request failed: {response.status_code} {response.text[:200]}")
            return time.perf_counter() - start

        def run_round(fusion: str, clients: int) -> tuple[float, list[float]]:
            _, url, image_id = servers[fusion]
            indices = list(range(args.requests))
            shares = [indices[offset::clients] for offset in range(clients)]

            def client_loop(share: list[int]) -> list[float]:
                with httpx.Client(base_url=url, timeout=600) as client:
                    return [one_request(client, image_id, index) for index in share]

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = [latency for part in pool.map(client_loop, shares) for latency in part]
            return args.requests / (time.perf_counter() - start), latencies

        for fusion in fusions:
            run_round(fusion, args.clients)  # warm-up
        results = {fusion: {"sequential": [], "concurrent": []} for fusion in fusions}
        ratios: dict[str, list[float]] = {fusion: [] for fusion in fusions}
        for _ in range(args.rounds):
            for fusion in fusions:
                sequential = run_round(fusion, 1)
                concurrent = run_round(fusion, args.clients)
                results[fusion]["sequential"].append(sequential)
                results[fusion]["concurrent"].append(concurrent)
                ratios[fusion].append(concurrent[0] / sequential[0])
        stats = {}
        for fusion, (_, url, _) in servers.items():
            with httpx.Client(base_url=url, timeout=60) as client:
                stats[fusion] = client.get("/v1/stats").json()
    finally:
        for process, _, _ in servers.values():
            stop_server(process)

    print(f"workload {args.workload}, SAM {args.sam_type} (random weights), {args.requests} requests per round, "
          f"{args.rounds} rounds, {args.workers} worker(s), worker threads {args.threads or 'default'}, "
          f"batch <= {args.max_batch_size}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for fusion in fusions:
        print(f"fusion {fusion}:")
        for mode, rounds in results[fusion].items():
            throughputs = [throughput for throughput, _ in rounds]
            latencies = [latency for _, part in rounds for latency in part]
            print(f"  {mode:>10} ({1 if mode == 'sequential' else args.clients} clients): "
                  f"{statistics.median(throughputs):6.2f} req/s (rounds: {', '.join(f'{t:.2f}' for t in throughputs)}), "
                  f"latency p50 {percentile(latencies, 0.5) * 1000:7.1f} ms, "
                  f"p99 {percentile(latencies, 0.99) * 1000:7.1f} ms")
        print(f"  worker batches: {stats[fusion]['batches']} for {stats[fusion]['requests']} requests, "
              f"largest {stats[fusion]['largest_batch']}")
        print(f"  throughput ratio concurrent/sequential: median {statistics.median(ratios[fusion]):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios[fusion])}); target >= 1.3x")
    if len(fusions) == 2:
        fused = [throughput for throughput, _ in results["on"]["concurrent"]]
        unfused = [throughput for throughput, _ in results["off"]["concurrent"]]
        print(f"concurrent throughput fused/unfused: median {statistics.median(f / u for f, u in zip(fused, unfused)):.2f}x "
              f"({', '.join(f'{f / u:.2f}' for f, u in zip(fused, unfused))})")


if __name__ == "__main__":
    main()
