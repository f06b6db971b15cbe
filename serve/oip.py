"""Open Inference Protocol v2 (KServe / Triton) REST codec for the student: no Ray, no HTTP server.

What the Serve app speaks (``{model}`` is the model card's ``name``):

* input: one BYTES tensor of encoded image files (PNG, JPEG, DICOM, ...), shape ``[N]``, either
  - in JSON: ``"data"`` holds base64 strings (JSON strings cannot carry raw bytes), or
  - through the binary-data extension: the JSON header is followed by the tensor's bytes
    (``parameters.binary_data_size``; each element a 4-byte little-endian length and its bytes), the
    header's length in ``Inference-Header-Content-Length``;
* outputs: FP32 ``probabilities`` ``[N, C]`` and BYTES ``label`` ``[N]``; each in binary when the request
  asks for it (``outputs[].parameters.binary_data``, else ``parameters.binary_data_output``), else in JSON;
* explanations: the request parameter ``"explain": true`` (or asking for the output ``explanation``) adds the
  BYTES output ``explanation`` ``[N]``: each element a PNG, the Grad-CAM overlay of the predicted class (as
  the input's images: raw bytes in binary, base64 strings in JSON); the response's ``parameters`` say which
  class each map explains (``explained_class``) and the torch weights' own top class (``torch_class``);
* a malformed request raises :class:`OipError`, which the app answers 400 ``{"error": "...", "reason": "..."}``;
* bounded before anything is built per image (:class:`serve.options.RequestOptions`): at most ``max_images``
  images, read from the tensor's shape (and, before the JSON is parsed, bounded by its commas); the JSON's
  nesting at most ``max_json_depth``, judged from its brackets before it is parsed.

This is what an unmodified ``tritonclient.http.InferenceServerClient`` sends and reads in both modes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from serve.options import REQUEST, RequestOptions

INPUT_NAME = "image"
PROBABILITIES, LABEL, EXPLANATION = "probabilities", "label", "explanation"
OUTPUTS = (PROBABILITIES, LABEL)
OPTIONAL_OUTPUTS = (EXPLANATION,)  # with the request parameter explain=true
HEADER_LENGTH = "inference-header-content-length"
PROTOCOL_EXTENSIONS = ["binary_tensor_data"]
#: JSON values a request may carry besides its images (names, shape, parameters, outputs): a generous bound.
OTHER_JSON_VALUES = 256
#: The refusals' reason codes.
TOO_MANY_IMAGES, JSON_TOO_DEEP, INVALID = "too_many_images", "json_too_deep", "invalid_request"
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # brackets inside strings do not nest


class OipError(ValueError):
    """A request that does not follow the protocol or exceeds its bounds (answered 400 with ``reason``)."""

    def __init__(self, message: str, reason: str = INVALID):
        super().__init__(message)
        self.reason = reason


@dataclass
class InferRequest:
    images: list[bytes]
    id: str | None = None
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # output name → binary? (the ones to return)
    parameters: dict = field(default_factory=dict)
    explain: bool = False


def parse_infer_request(body: bytes, header_length: str | None, limits: RequestOptions = REQUEST) -> InferRequest:
    """The request's images and what it wants back. CPU-bound on large bodies: callers run it off the event
    loop."""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise OipError(f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}") from None
        if not 0 < json_length <= len(body):
            raise OipError(f"Inference-Header-Content-Length {json_length} does not fit a {len(body)}-byte body")
        header_bytes, binary = body[:json_length], memoryview(body)[json_length:]
    else:
        header_bytes, binary = body, memoryview(b"")
    _check_json_bounds(header_bytes, limits)
    try:
        header = json.loads(header_bytes)
    except RecursionError:  # only past the interpreter's limit, which max_json_depth keeps far away
        raise OipError("the request header nests too deeply", JSON_TOO_DEEP) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OipError(f"the request header is not valid JSON ({exc.__class__.__name__} at byte "
                       f"{getattr(exc, 'pos', getattr(exc, 'start', 0))})") from None
    if not isinstance(header, dict):
        raise OipError("the request header must be a JSON object")
    parameters = _mapping(header.get("parameters"), "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OipError(f"the request needs exactly one input, the BYTES tensor {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise OipError(f"unknown input {str(tensor.get('name'))[:60]!r}: the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "BYTES":
        raise OipError(f"input {INPUT_NAME!r} must have datatype BYTES (encoded image files), "
                       f"got {str(tensor.get('datatype'))[:20]!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise OipError(f"input {INPUT_NAME!r} must have shape [N] with N >= 1, got {str(shape)[:40]}")
    count = shape[0]
    if count > limits.max_images:
        raise OipError(f"input {INPUT_NAME!r} has {count} images; at most {limits.max_images} are accepted per "
                       "request", TOO_MANY_IMAGES)
    binary_size = _mapping(tensor.get("parameters"), "inputs[0].parameters").get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(binary):
            raise OipError(f"input {INPUT_NAME!r} declares binary_data_size {binary_size} but "
                           f"{len(binary)} bytes follow the header")
        images = _split_bytes_tensor(binary, count)
    else:
        if len(binary):
            raise OipError("binary data follows the header but no input declares binary_data_size")
        images = _base64_elements(tensor.get("data"), count)
    wanted = _wanted_outputs(header, parameters)
    explain = _explain_parameter(parameters) or EXPLANATION in wanted
    if explain and EXPLANATION not in wanted:
        wanted[EXPLANATION] = bool(parameters.get("binary_data_output", False))
    return InferRequest(images, _request_id(header.get("id")), wanted, parameters, explain)


def encode_infer_response(model: str, version: str, request: InferRequest, probabilities: np.ndarray,
                          labels: list[str], explanations: list | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the response: JSON, or a JSON header plus binary tensors.

    ``explanations``: :class:`kdray.explain.Explanation` per image when the request asked to explain."""
    probabilities = np.ascontiguousarray(probabilities, dtype="<f4")
    tensors = {PROBABILITIES: ("FP32", list(probabilities.shape), probabilities),
               LABEL: ("BYTES", [len(labels)], [v.encode() for v in labels])}
    if explanations is not None:
        tensors[EXPLANATION] = ("BYTES", [len(explanations)], [e.overlay_png for e in explanations])
    outputs, chunks = [], []
    for name, binary in request.binary_outputs.items():
        datatype, shape, value = tensors[name]
        out = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            raw = value.tobytes() if datatype == "FP32" else _join_bytes_tensor(value)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "FP32":
            out["data"] = value.reshape(-1).tolist()
        else:  # JSON strings: labels as text, images (explanations) base64
            out["data"] = [v.decode() for v in value] if name == LABEL else \
                [base64.b64encode(v).decode("ascii") for v in value]
        outputs.append(out)
    header = {"model_name": model, "model_version": version, "outputs": outputs}
    if explanations is not None:
        header["parameters"] = {"explained_class": ",".join(e.explained_class for e in explanations),
                                "torch_class": ",".join(e.torch_class for e in explanations)}
    if request.id is not None:
        header["id"] = request.id
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return header_bytes, {"content-type": "application/json"}
    return b"".join([header_bytes, *chunks]), {"content-type": "application/octet-stream",
                                                HEADER_LENGTH: str(len(header_bytes))}


def model_metadata(model: str, version: str, classes: list[str], platform: str) -> dict:
    return {"name": model, "versions": [version], "platform": platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(classes)]},
                        {"name": LABEL, "datatype": "BYTES", "shape": [-1]}]}


def server_metadata(version: str) -> dict:
    return {"name": "kdray", "version": version, "extensions": PROTOCOL_EXTENSIONS}


def platform_of(backend: str) -> str:
    """The model metadata's ``platform`` for a kdray backend, in Triton's names."""
    return "onnxruntime_onnx" if backend.startswith("onnx") else "pytorch_libtorch"


# -- helpers

def _check_json_bounds(header: bytes, limits: RequestOptions) -> None:
    """Refuse, before parsing, a JSON header with more values than ``max_images`` allow or nested deeper than
    ``max_json_depth``. Both counts run in C over the bytes: a request's base64 images hold no commas and no
    brackets, so legitimate requests pass on the counts alone."""
    values = header.count(b",") + 1
    if values > limits.max_images + OTHER_JSON_VALUES:
        raise OipError(f"the request header holds about {values} JSON values; at most {limits.max_images} images "
                       "are accepted per request", TOO_MANY_IMAGES)
    if header.count(b"[") + header.count(b"{") <= limits.max_json_depth:
        return
    outside_strings = np.frombuffer(_JSON_STRING.sub(b'""', header), np.uint8)
    brackets = outside_strings[np.isin(outside_strings, np.frombuffer(b"[{]}", np.uint8))]
    steps = np.isin(brackets, np.frombuffer(b"[{", np.uint8)).astype(np.int32) * 2 - 1  # +1 open, -1 close
    if steps.size and int(np.cumsum(steps).max()) > limits.max_json_depth:
        raise OipError(f"the request header nests deeper than {limits.max_json_depth} levels", JSON_TOO_DEEP)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OipError(f"{where} must be a JSON object")
    return value


def _request_id(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise OipError("the request id must be a string")
    return value[:256]


def _wanted_outputs(header: dict, parameters: dict) -> dict[str, bool]:
    default_binary = bool(parameters.get("binary_data_output", False))
    requested = header.get("outputs")
    if requested is None:
        return {name: default_binary for name in OUTPUTS}
    if not isinstance(requested, list) or not requested:
        raise OipError("outputs must be a non-empty list when given")
    wanted = {}
    for out in requested:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in OUTPUTS + OPTIONAL_OUTPUTS:
            raise OipError(f"unknown output {str(name)[:60]!r}; the model's outputs are "
                           f"{', '.join(OUTPUTS + OPTIONAL_OUTPUTS)}")
        wanted[name] = bool(_mapping(out.get("parameters"), f"outputs[{name}].parameters")
                            .get("binary_data", default_binary))
    return wanted


def _explain_parameter(parameters: dict) -> bool:
    value = parameters.get("explain", False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise OipError(f"parameters.explain must be a boolean, got {str(value)[:40]!r}")


def _split_bytes_tensor(raw: memoryview, count: int) -> list[bytes]:
    """Triton's binary BYTES layout: per element a 4-byte little-endian length, then that many bytes."""
    items, offset = [], 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise OipError(f"binary input {INPUT_NAME!r} ends before element {index} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise OipError(f"binary input {INPUT_NAME!r}: element {index} declares {length} bytes, "
                           f"{len(raw) - offset} remain")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    if offset != len(raw):
        raise OipError(f"binary input {INPUT_NAME!r} has {len(raw) - offset} bytes after its {count} elements")
    return items


def _join_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _base64_elements(data, count: int) -> list[bytes]:
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]  # a nested [[...]] form of a 1-D tensor
    if not isinstance(data, list) or len(data) != count:
        raise OipError(f"input {INPUT_NAME!r} must carry {count} base64 strings in 'data' (JSON mode), "
                       f"or binary data (binary_data_size)")
    images = []
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise OipError(f"input {INPUT_NAME!r} element {index} must be a base64 string")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise OipError(f"input {INPUT_NAME!r} element {index} is not valid base64 (in JSON mode, image "
                           "bytes are sent base64-encoded)") from None
    return images
