"""The Triton model repository: configs parsed by Triton's own protobuf, and the routing `unet` model."""

import json
import sys
import types

import numpy as np
import pytest

from export_helpers import copy_of, exported
from maskopt import Buckets, MaskoptError
from maskopt.export import triton
from maskopt.export.shapes import Signature
from maskopt.export.triton_unet import TritonPythonModel, variant_for

RANGES = [(0, 332), (333, 666), (667, 999)]


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "xl"])
def test_repository_configs_parse_with_triton_protobuf(xl):
    root = exported(xl) / "triton"
    configs = triton.validate_repository(root)
    assert sorted(configs) == ["unet", "unet_b0", "unet_b1", "unet_b2"]
    names = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if xl else [])
    for name, c in configs.items():
        assert [i.name for i in c.input] == names and [o.name for o in c.output] == ["out_sample"]
        assert list(c.input[0].dims) == [-1, 4, -1, -1] and list(c.input[1].dims) == [1]
        assert c.max_batch_size == 0
        if name == "unet":
            assert c.backend == "python" and (root / "unet" / "1" / "model.py").is_file()
            params = {k: v.string_value for k, v in c.parameters.items()}
            assert json.loads(params["buckets"]) == [list(r) for r in RANGES]
            assert json.loads(params["variants"]) == ["unet_b0", "unet_b1", "unet_b2"]
            assert c.instance_group[0].count == 4  # --triton-instances: 4 requests served at once by default
        else:
            assert c.platform == "onnxruntime_onnx" and c.default_model_filename == "model.onnx"
            # the served file is the export's own (a hard link or a copy of the same bytes)
            assert (root / name / "1" / "model.onnx").read_bytes() == (root.parent / f"{name}.onnx").read_bytes()


def test_plan_config_and_validation_errors(tmp_path):
    sig = Signature(4, 4, 16)
    from google.protobuf import text_format

    text = text_format.MessageToString(triton.variant_config("unet_b0", sig, triton.BACKENDS["plan"]))
    (tmp_path / "unet_b0" / "1").mkdir(parents=True)
    (tmp_path / "unet_b0" / "config.pbtxt").write_text(text)
    with pytest.raises(MaskoptError, match="version 1 has no model.plan"):
        triton.validate_repository(tmp_path)
    (tmp_path / "unet_b0" / "1" / "model.plan").write_bytes(b"engine")
    c = triton.validate_repository(tmp_path)["unet_b0"]
    assert c.platform == "tensorrt_plan" and c.instance_group[0].kind == c.instance_group[0].KIND_GPU
    (tmp_path / "unet_b0" / "config.pbtxt").write_text(text.replace('name: "unet_b0"', 'name: "other"'))
    with pytest.raises(MaskoptError, match="differs from its folder"):
        triton.validate_repository(tmp_path)
    (tmp_path / "unet_b0" / "config.pbtxt").write_text(text.replace("TYPE_FP32", "TYPE_FLOAT", 1))
    with pytest.raises(MaskoptError, match="not a valid Triton model config"):
        triton.validate_repository(tmp_path)


def test_router_refers_to_missing_variant():
    root = copy_of(exported(), "triton_missing") / "triton"
    import shutil

    shutil.rmtree(root / "unet_b2")
    with pytest.raises(MaskoptError, match="routes to 'unet_b2', which is not in the repository"):
        triton.validate_repository(root)


def test_variant_for_at_bucket_edges_equals_buckets_index():
    edges = {0: 0, 332: 0, 332.999: 0, 333: 1, 666: 1, 666.5: 1, 667: 2, 999: 2, 999.9: 2, -1: 0, 1500: 2}
    for t, k in edges.items():
        assert variant_for(t, RANGES) == k, t
    # the copy inside model.py must agree with maskopt's own rule at every timestep
    for buckets in (Buckets(tuple(RANGES)), Buckets.uniform(7), Buckets.from_edges([10, 11, 900])):
        for t in np.arange(-2, 1002, 0.5):
            assert variant_for(t, buckets.ranges) == buckets.index(t), (t, buckets)


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


def _fake_pb_utils(calls):
    """Just enough of triton_python_backend_utils to run the model's execute() outside Triton."""
    pb = types.ModuleType("triton_python_backend_utils")

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            calls.append((self.model_name, [t.name for t in self.inputs]))
            return types.SimpleNamespace(has_error=lambda: False, outputs=[_Tensor("out_sample", [self.model_name])])

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    class TritonError(str):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __new__(cls, message, code="INTERNAL"):
            error = super().__new__(cls, message)
            error.code = code
            return error

    pb.InferenceRequest, pb.InferenceResponse, pb.TritonError = InferenceRequest, InferenceResponse, TritonError
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    pb.get_output_tensor_by_name = lambda result, name: next(t for t in result.outputs if t.name == name)
    return pb


def test_router_model_forwards_each_request_to_its_variant(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils(calls))
    config = triton.parse_config(exported() / "triton" / "unet" / "config.pbtxt")
    from google.protobuf import json_format

    model = TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True)})
    sample = np.zeros((2, 4, 8, 8), np.float32)

    def request(*t):
        return {"sample": _Tensor("sample", sample), "timestep": _Tensor("timestep", np.array(t, np.float32)),
                "encoder_hidden_states": _Tensor("encoder_hidden_states", np.zeros((2, 16, 16), np.float32))}

    bad = {(10.0, 900.0): "one request mixes timesteps", (float("nan"),): "timestep nan is not a finite number",
           (float("-inf"),): "timestep -inf is not a finite number", (): "timestep is empty"}
    # -1 and 1000: diffusers' schedulers hand them over at some step counts ("trailing", "leading" + steps_offset)
    good = [999.0, 500.0, 0.0, 999.9, -1.0, 1000.0]
    responses = model.execute([request(t) for t in good] + [request(*t) for t in bad])
    served = ["unet_b2", "unet_b1", "unet_b0", "unet_b2", "unet_b0", "unet_b2"]
    assert [c[0] for c in calls] == served
    assert calls[0][1] == ["sample", "timestep", "encoder_hidden_states"]  # every input forwarded
    assert [r.output_tensors[0].array[0] for r in responses[:6]] == served
    for r, message in zip(responses[6:], bad.values()):  # each bad request answered alone, as the client's fault
        assert r.error is not None and message in r.error and r.error.code == "INVALID_ARG", (r.error, message)


def test_variant_that_takes_fewer_inputs(tmp_path, monkeypatch):
    """A TensorRT engine drops inputs nothing reads: its config lists what it kept, and the router forwards
    only those to it."""
    sig = Signature(4, 4, 16)
    files = []
    for k in range(3):
        plan = tmp_path / f"unet_b{k}.plan"
        plan.write_bytes(b"engine %d" % k)
        files.append({"plan": plan})
    takes = [None, ["sample", "timestep"], None]
    triton.write_repository(tmp_path / "triton", sig, RANGES, files, "plan", 1000, takes)
    configs = triton.validate_repository(tmp_path / "triton")
    assert [i.name for i in configs["unet_b1"].input] == ["sample", "timestep"]
    assert [i.name for i in configs["unet"].input] == list(sig.input_names)
    calls = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils(calls))
    from google.protobuf import json_format

    model = TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(configs["unet"], preserving_proto_field_name=True)})
    request = {n: _Tensor(n, np.zeros(2, np.float32) + 500) for n in sig.input_names}
    model.execute([request])
    assert calls == [("unet_b1", ["sample", "timestep"])]


def test_router_instances_are_set_at_export_and_checked(tmp_path):
    from export_helpers import cli, masks, pipeline

    r = cli("export", "--masks", masks(), "--model", pipeline(), "--out", tmp_path / "two", "--onnx", "--triton",
            "--triton-instances", 2)
    assert r.exit_code == 0, r.output
    assert triton.validate_repository(tmp_path / "two" / "triton")["unet"].instance_group[0].count == 2
    r = cli("export", "--masks", masks(), "--model", pipeline(), "--out", tmp_path / "none", "--triton", "--triton-instances", 0)
    assert r.exit_code == 1 and "--triton-instances must be at least 1, got 0" in r.output
    assert not (tmp_path / "none").exists()
