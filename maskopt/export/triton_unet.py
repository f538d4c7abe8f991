"""Triton Python-backend model `unet`: read the timestep, forward the request to its variant (BLS).

This file is copied verbatim into the model repository as `unet/1/model.py`; Triton runs it without
maskopt installed, so it uses only the standard library, NumPy and Triton's `triton_python_backend_utils`
(imported inside the methods, so that maskopt's tests can import this module and test `variant_for`).
Its configuration comes from `unet/config.pbtxt`'s parameters:

    buckets              JSON [[lo, hi], ...]: inclusive timestep ranges, lowest first
    variants             JSON ["unet_b0", ...]: the model serving each bucket
    num_train_timesteps  the scheduler's training timesteps (the buckets cover 0 .. T-1)
    variant_inputs       optional JSON [[names], ...]: the inputs each variant takes, when a TensorRT
                         engine dropped one that nothing in it reads; default: all of this model's

A stack that called one U-Net model keeps calling one: same inputs, same output, any finite timestep
(floored, clamped into 0..T-1). A request whose timestep is NaN, infinite or mixed within the request is
answered with an INVALID_ARG error naming it (the others of a batch are served).
"""

import json
import math


def variant_for(timestep, ranges, num_train_timesteps=1000):
    """Index of the bucket holding `timestep`: floored, clamped into 0 .. T-1 (maskopt's Buckets.index rule).

    Clamped, not refused: diffusers' own schedulers hand the U-Net t = -1 ("trailing" spacing at some step
    counts) and t = T ("leading" with steps_offset 1 at T steps). `one_timestep` refuses NaN and infinity."""
    t = min(max(math.floor(float(timestep)), 0), num_train_timesteps - 1)
    for k, (lo, hi) in enumerate(ranges):
        if lo <= t <= hi:
            return k
    raise RuntimeError(f"timestep {timestep} is in no bucket of {ranges}: the router's buckets do not cover 0..T-1")


def one_timestep(values):
    """The single timestep of a request; a request mixing timesteps has no single variant."""
    flat = [float(v) for v in values.reshape(-1)]
    if not flat:
        raise ValueError("timestep is empty")
    bad = next((v for v in flat if not math.isfinite(v)), None)
    if bad is not None:  # NaN is unequal to itself: checked before the comparison below
        raise ValueError(f"timestep {bad} is not a finite number")
    if any(v != flat[0] for v in flat):
        raise ValueError(f"one request mixes timesteps {sorted(set(flat))[:4]}: each variant serves one bucket")
    return flat[0]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.ranges = [tuple(r) for r in json.loads(params["buckets"])]
        self.variants = json.loads(params["variants"])
        self.num_train_timesteps = int(params.get("num_train_timesteps", "1000"))
        inputs = [i["name"] for i in config["input"]]
        self.variant_inputs = json.loads(params.get("variant_inputs", "null")) or [inputs] * len(self.variants)
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                t = one_timestep(pb_utils.get_input_tensor_by_name(request, "timestep").as_numpy())
                k = variant_for(t, self.ranges, self.num_train_timesteps)
                model = self.variants[k]
                inputs = [pb_utils.get_input_tensor_by_name(request, n) for n in self.variant_inputs[k]]
                result = pb_utils.InferenceRequest(
                    model_name=model, requested_output_names=self.outputs, inputs=inputs
                ).exec()
                if result.has_error():  # the variant's own error (and code: a bad shape stays INVALID_ARG)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[], error=result.error()))
                    continue
                outputs = [pb_utils.get_output_tensor_by_name(result, n) for n in self.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except ValueError as e:  # the request's fault: INVALID_ARG (HTTP 400), which clients must not retry
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(pb_utils, str(e), "INVALID_ARG")))
            except Exception as e:  # one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(pb_utils, str(e), "INTERNAL")))
        return responses


def _error(pb_utils, message, code):
    """A TritonError with `code` where this Python backend has error codes (23.05 and later), else without."""
    value = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message, value)
