"""The exported Triton repository served by a real tritonserver (triton_server.py), through tritonclient.

The variants run on the test onnxruntime stand-in (triton_backend/model.py); the router is the exported
unet/1/model.py, unchanged. Answers are compared with ONNX Runtime on the variant of the timestep's bucket.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from export_helpers import exported
from triton_server import TritonServer, server_env

# CI sets MASKOPT_REQUIRE_TRITON=1 (.ci/run): there a server that cannot be had fails, it is not skipped
REQUIRED = os.environ.get("MASKOPT_REQUIRE_TRITON") == "1"


def _unavailable(why: str, module: bool = False) -> None:
    if REQUIRED:
        pytest.fail(why)
    pytest.skip(why, allow_module_level=module)


try:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError as e:  # the dev extra has it
    _unavailable(f"tritonclient[http,grpc] is not installed: {e}", module=True)

pytestmark = pytest.mark.triton
# -1 and 1000 too: diffusers' schedulers hand them over at some step counts; they are clamped, as everywhere
EDGES = [-1.0, 0.0, 100.0, 332.0, 332.9, 333.0, 500.5, 666.0, 667.0, 998.0, 999.0, 999.5, 1000.0]


@pytest.fixture(scope="module")
def env():
    found, why = server_env()
    if found is None:
        _unavailable(f"no tritonserver environment: {why}")
    return found


@pytest.fixture(scope="module", params=["sd", "xl"])
def served(request, env):
    root = exported(request.param == "xl")
    with TritonServer(env, root / "triton") as server:
        yield root, server
        assert server.alive(), server.read_log()[-3000:]  # it served every test of the module without dying
    assert "unhealthy" not in server.log, server.log[-3000:]  # no Python stub died on the way


def inputs_for(root, t, batch=1, seed=0):
    """Random inputs of the exported signature (manifest.json), timestep t."""
    manifest = json.loads((root / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    sizes = {"B": batch, "H": 8, "W": 8, "S": 5}
    feeds = {}
    for spec in manifest["inputs"]:
        name, shape = spec["name"], [sizes[d] if isinstance(d, str) else d for d in spec["shape"]]
        feeds[name] = np.full(shape, t, np.float32) if name == "timestep" else rng.standard_normal(shape).astype(np.float32)
    return feeds


def bucket_of(root, t):
    """The bucket maskopt itself routes t to (Buckets.index: floored, clamped)."""
    from maskopt.buckets import Buckets

    variants = json.loads((root / "manifest.json").read_text())["variants"]
    return Buckets(tuple(tuple(v["timesteps"]) for v in variants)).index(float(t))


def infer(client_module, url, feeds, model="unet"):
    client = client_module.InferenceServerClient(url)
    wire = []
    for name, array in feeds.items():
        i = client_module.InferInput(name, list(array.shape), {np.float32: "FP32", np.float64: "FP64",
                                                               np.int64: "INT64"}[array.dtype.type])
        i.set_data_from_numpy(array)
        wire.append(i)
    return client.infer(model, wire).as_numpy("out_sample")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_timestep_is_served_by_its_buckets_variant(served, protocol):
    root, server = served
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    sessions = {}
    for i, t in enumerate(EDGES):
        feeds = inputs_for(root, t, batch=1 + i % 2, seed=i)
        k = bucket_of(root, t)
        if k not in sessions:
            sessions[k] = ort.InferenceSession(str(root / f"unet_b{k}.onnx"), providers=["CPUExecutionProvider"])
        want = sessions[k].run(None, feeds)[0]
        got = infer(module, url, feeds)
        assert got.shape == want.shape and np.array_equal(got, want), (t, k)
    assert len(sessions) == 3  # every bucket was reached


@pytest.mark.parametrize("timestep,message", [
    (float("nan"), "timestep nan is not a finite number"),
    (float("inf"), "timestep inf is not a finite number"),
    (float("-inf"), "timestep -inf is not a finite number"),
])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_timesteps_get_an_error_naming_them_and_the_server_stays_up(served, timestep, message, protocol):
    root, server = served
    module, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    with pytest.raises(InferenceServerException, match=message) as e:
        infer(module, url, inputs_for(root, timestep))
    assert "INVALID_ARG" in str(e.value.status()) or "400" in str(e.value.status())  # the client's fault, not the server's
    assert server.alive()
    assert infer(httpclient, server.http_url, inputs_for(root, 500.0)).shape[0] == 1  # and still serves


def test_malformed_requests_are_refused_one_by_one(served):
    """Each refused with a message naming the input (by Triton for what the config rules out, by the variant
    for a wrong channel count), the server up and answering right after each."""
    root, server = served
    good = inputs_for(root, 500.0)
    cases = {
        "two timesteps": ({**good, "timestep": np.array([10.0, 900.0], np.float32)}, "timestep"),
        "float64 timestep": ({**good, "timestep": good["timestep"].astype(np.float64)}, "timestep"),
        "3 latent channels": ({**good, "sample": good["sample"][:, :3]}, "sample"),
    }
    want = ort.InferenceSession(str(root / f"unet_b{bucket_of(root, 500.0)}.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, good)[0]
    for what, (feeds, named) in cases.items():
        with pytest.raises(InferenceServerException) as e:
            infer(httpclient, server.http_url, feeds)
        assert named in str(e.value), (what, str(e.value))
        assert server.alive(), what
        assert np.array_equal(infer(httpclient, server.http_url, good), want), what


@pytest.mark.parametrize("scheme", ["", "grpc://"])
def test_generate_through_the_server_equals_the_onnxruntime_backend(served, tmp_path, scheme):
    """`maskopt generate --backend triton`: the pipeline here, every U-Net call through the router on the server."""
    from PIL import Image

    from export_helpers import cli

    root, server = served
    url = scheme + (server.grpc_url if scheme else server.http_url)
    common = ("generate", "--prompt", "a red cat", "--export", root, "--steps", 6, "--seed", 2)
    r = cli(*common, "--backend", "triton", "--url", url, "--out", tmp_path / "triton.png")
    assert r.exit_code == 0, r.output
    assert "triton backend" in r.output
    assert cli(*common, "--out", tmp_path / "ort.png").exit_code == 0
    a = np.asarray(Image.open(tmp_path / "triton.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "ort.png"), np.int16)
    assert a.std() > 1 and np.abs(a - b).max() <= 1  # the same variants; ONNX Runtime's thread count may round apart


def test_generate_names_a_server_that_is_not_there_or_serves_something_else(served, tmp_path):
    from export_helpers import cli
    from triton_server import _free_port

    root, server = served
    common = ("generate", "--prompt", "x", "--export", root, "--steps", 2, "--out", tmp_path / "x.png", "--backend", "triton")
    r = cli(*common, "--url", f"127.0.0.1:{_free_port()}")
    assert r.exit_code == 1 and "no Triton server answers at 127.0.0.1:" in r.output
    r = cli(*common)
    assert r.exit_code == 1 and "the triton backend needs --url" in r.output
    assert not (tmp_path / "x.png").exists()


def test_concurrent_clients_at_mixed_timesteps_all_get_their_answers(served):
    """4 clients x 6 requests at once, over every bucket: every answer is its variant's (bounded in count and time)."""
    import threading

    root, server = served
    sessions = [ort.InferenceSession(str(root / f"unet_b{k}.onnx"), providers=["CPUExecutionProvider"]) for k in range(3)]
    work = [[inputs_for(root, float(t), seed=10 * c + i) for i, t in enumerate(np.linspace(0, 999, 6) + 37 * c)]
            for c in range(4)]
    wrong, answered = [], []

    def client(items):
        for feeds in items:
            feeds["timestep"] = feeds["timestep"] % 1000
            want = sessions[bucket_of(root, feeds["timestep"][0])].run(None, feeds)[0]
            got = infer(httpclient, server.http_url, feeds)
            answered.append(1)
            if not np.array_equal(got, want):
                wrong.append(float(feeds["timestep"][0]))

    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads) and len(answered) == 24 and not wrong
