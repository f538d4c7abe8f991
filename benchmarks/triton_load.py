"""Concurrent load on the exported Triton repository in a real tritonserver on localhost.

    python benchmarks/triton_load.py                          # 1 and 4 router instances, 1 and 4 clients
    python benchmarks/triton_load.py --requests 60 --instances 1 2 4

The embedded default's U-Net, 4 buckets with seeded random mask values, exported with `--triton
--triton-instances N`, is served by the server the tests use (tests/triton_server.py: the nvidia-pytriton
wheel's tritonserver, the variants on the test onnxruntime stand-in). C clients send M requests each at
timesteps spread over every bucket; every answer is checked against ONNX Runtime on its bucket's variant
(nothing dropped, nothing wrong), and p50/p99 latency and throughput are printed per setting, then the
throughput ratio of 4 clients on N router instances to 4 clients on 1. Bounded: M requests per client,
a 60 s timeout per request. With 40 requests per client, p99 is about the slowest request.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def export_repository(out: Path, instances: int) -> Path:
    from maskopt import Buckets, MaskSet, find_units
    from maskopt.export import ExportConfig, export
    from maskopt.models import load_unet

    unet = load_unet("maskopt:default")
    masks = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(4))
    values = np.random.default_rng(0).uniform(0.5, 1.2, masks.values.shape)
    path = masks.with_values(values).save(out.parent / f"masks_{instances}.json")
    export(ExportConfig(masks=path, out=out, triton=True, triton_instances=instances))
    return out


def requests_for(root: Path, n: int, seed: int, timesteps: list[float] | None = None) -> list[tuple[dict, np.ndarray]]:
    """n requests at timesteps over every bucket, each with ONNX Runtime's answer on its variant."""
    import onnxruntime as ort

    from maskopt.export.manifest import Manifest

    from maskopt.models import load_unet

    manifest = Manifest.load(root)
    sessions = [ort.InferenceSession(str(root / v.files["onnx"].path), providers=["CPUExecutionProvider"])
                for v in manifest.variants]
    side = load_unet("maskopt:default").config.sample_size  # the latents of a searched-size image, guidance 1: batch 1
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = float(rng.uniform(0, 999)) if timesteps is None else timesteps[i]
        feeds = {"sample": rng.standard_normal((1, 4, side, side)).astype(np.float32),
                 "timestep": np.array([t], np.float32),
                 "encoder_hidden_states": rng.standard_normal((1, 8, manifest.signature.context_dim)).astype(np.float32)}
        out.append((feeds, sessions[manifest.buckets.index(t)].run(None, feeds)[0]))
    return out


def run_clients(url: str, work: list[list[tuple[dict, np.ndarray]]]) -> tuple[list[float], float, int]:
    """Each client (thread) sends its requests one after another; returns latencies, wall time, wrong answers."""
    import tritonclient.http as httpclient

    latencies: list[float] = []
    wrong = [0]
    lock = threading.Lock()

    def client(items):
        c = httpclient.InferenceServerClient(url, network_timeout=60.0, connection_timeout=60.0)
        for feeds, want in items:
            inputs = []
            for name, array in feeds.items():
                i = httpclient.InferInput(name, list(array.shape), "FP32")
                i.set_data_from_numpy(array)
                inputs.append(i)
            t0 = time.perf_counter()
            got = c.infer("unet", inputs).as_numpy("out_sample")
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                wrong[0] += not np.array_equal(got, want)

    threads = [threading.Thread(target=client, args=(items,)) for items in work]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, time.perf_counter() - t0, wrong[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 4], help="router instances to compare")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from triton_server import TritonServer, server_env

    env, why = server_env()
    if env is None:
        sys.exit(f"no tritonserver environment: {why}")
    throughput: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="maskopt-triton-load-") as tmp:
        for instances in args.instances:
            root = export_repository(Path(tmp) / f"export_{instances}", instances)
            with TritonServer(env, root / "triton") as server:
                mids = [float(sum(v["timesteps"]) / 2) for v in json.loads((root / "manifest.json").read_text())["variants"]]
                run_clients(server.http_url, [requests_for(root, len(mids), seed=99, timesteps=mids)])  # every variant warm
                for clients in args.clients:
                    work = [requests_for(root, args.requests, seed=c) for c in range(clients)]
                    lat, wall, wrong = run_clients(server.http_url, work)
                    n = len(lat)
                    if n != clients * args.requests or wrong:
                        sys.exit(f"{instances} instances, {clients} clients: {n} answers of {clients * args.requests}, "
                                 f"{wrong} wrong")
                    throughput[instances, clients] = n / wall
                    print(f"router instances {instances}, clients {clients}: {n} requests, all correct; "
                          f"p50 {1e3 * np.percentile(lat, 50):.1f} ms, p99 {1e3 * np.percentile(lat, 99):.1f} ms, "
                          f"{n / wall:.1f} requests/s")
    most, least = max(args.instances), min(args.instances)
    c = max(args.clients)
    if most != least and (most, c) in throughput:
        print(f"throughput with {c} clients, {most} router instances / {least}: "
              f"{throughput[most, c] / throughput[least, c]:.2f}x")


if __name__ == "__main__":
    main()
