"""The KServe v2 / Open Inference Protocol inference request as pydantic models: one schema, for
validation and for the OpenAPI page (`INFER_BODY`, `OPENAPI_SCHEMAS`).

    InferRequest   id (echoed), parameters, inputs, outputs
    parameters     steps (1..MAX_STUDENT_STEPS, default all), prompt (string), tile (off, auto, HxW[:O]),
                   timeout (microseconds,
                   Triton's unit); tritonclient's binary_data_output, priority and sequence_* (ignored)
    inputs         a union on `name`, each name with its own datatypes:
                   latent FP32|FP16 [B, C, h, w]; sigma FP32 [B] (optional); seed INT64|INT32 [B] (optional)
    outputs        image (UINT8 [B, H, W, 3]), parameters.binary_data

`parse_infer_request(body, header_length)` reads Triton's binary tensor data extension (the first
`Inference-Header-Content-Length` bytes are the JSON, the rest the tensors, in input order) and
`InferRequest.tensors(binary)` the tensors. Failures are ApiErrors: 400 when the body is not the
protocol's JSON object (not JSON, not an object, no "inputs" list, an input or "parameters" that is
not an object), 422 for the rest; each message says what to send instead.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WrapValidator,
    model_validator,
)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from pidserve.model import MAX_STUDENT_STEPS

from .errors import ApiError, ascii_integer, bad_request, unprocessable
from .service import TENSOR, DecodeRequest

# Wire datatypes -> numpy dtype, for the inputs we accept.
NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}
MAX_DIMS = 8  # no input has more than 4; numpy itself stops at 64
INVALID = "invalid_input"  # the error type of the messages written here (said as they are)


def _invalid(message: str) -> PydanticCustomError:
    # The message goes in as context, so braces in it are never read as a template.
    return PydanticCustomError(INVALID, "{message}", {"message": message})


def _says(message: str) -> WrapValidator:
    """Validate as the annotated type does (and keep its schema), failing with `message`;
    `{value}` in it is what was sent."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _invalid(message.format(value=_short(value))) from None

    return WrapValidator(validate)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- inputs ---------------------------------------------------------------------------------------
class TensorParameters(BaseModel):
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Bytes of this tensor in the binary part of the body (binary data extension)."
    )


class _InputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(
        max_length=MAX_DIMS, description="Dimensions, e.g. [1, 16, 32, 32]."
    )
    data: list | None = Field(None, description="The values in row-major order (flat or nested).")
    parameters: TensorParameters | None = None

    def array(self, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
        """This input's values (a native-byte-order copy) and the offset of the next input's bytes."""
        name, datatype, shape = self.name, self.datatype, self.shape
        dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
        count = math.prod(shape)
        size = self.parameters.binary_data_size if self.parameters else None
        if size is not None:
            if size != count * dtype.itemsize or offset + size > len(binary):
                raise unprocessable(
                    f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {datatype} "
                    f"({count * dtype.itemsize} bytes) or the {len(binary) - offset} bytes left in the body"
                )
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        elif self.data is not None:
            kinds = (int,) if datatype.startswith("INT") else (int, float)
            values = _flatten(self.data, max(len(shape), 1))
            # type() rather than isinstance: JSON true/false are bools, which isinstance counts as int
            if values is None or any(type(value) not in kinds for value in values):
                kind = "integers" if kinds == (int,) else "numbers"
                raise unprocessable(
                    f"input {name!r}: data must be {kind} of type {datatype}, "
                    f"flat or nested at most {len(shape)} deep"
                )
            try:
                array = np.asarray(values, dtype=dtype)
            except (TypeError, ValueError, OverflowError):
                raise unprocessable(f"input {name!r}: data must be numbers of type {datatype}") from None
            if array.size != count:
                raise unprocessable(f"input {name!r}: {array.size} values given for shape {shape}")
            array = array.reshape(shape)
        else:
            raise unprocessable(f"input {name!r} has neither data nor parameters.binary_data_size")
        return array.astype(dtype.newbyteorder("="), copy=True), offset


def _flatten(data: list, depth: int) -> list | None:
    """Nested lists -> their values in row-major order; None when nested deeper than `depth`."""
    if depth < 1:
        return None
    if not any(isinstance(item, list) for item in data):
        return data
    values: list = []
    for item in data:
        if not isinstance(item, list):
            values.append(item)
            continue
        inner = _flatten(item, depth - 1)
        if inner is None:
            return None
        values.extend(inner)
    return values


class LatentInput(_InputTensor):
    """The latent to decode, [B, C, h, w] (normalised, as the generator produced it)."""

    name: Literal["latent"]
    datatype: Literal["FP32", "FP16"]


class SigmaInput(_InputTensor):
    """The latents' noise level in [0, 1], [B] (optional; default 0, a clean latent)."""

    name: Literal["sigma"]
    datatype: Literal["FP32"]


class SeedInput(_InputTensor):
    """Noise seeds, [B] (optional; default random, reported in X-Seed)."""

    name: Literal["seed"]
    datatype: Literal["INT64", "INT32"]


InferInput = Annotated[LatentInput | SigmaInput | SeedInput, Field(discriminator="name")]
INPUT_NAMES = "latent, sigma (optional), seed (optional)"


# ---- parameters and outputs -----------------------------------------------------------------------
class InferParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: Annotated[
        StrictInt,
        Field(ge=1, le=MAX_STUDENT_STEPS, description="Student steps."),
        _says(f"parameter steps must be an integer 1-{MAX_STUDENT_STEPS}; got {{value}}"),
    ] = MAX_STUDENT_STEPS
    prompt: Annotated[
        StrictStr | None,
        Field(description="Text for text-conditioned models."),
        _says("parameter prompt must be a string"),
    ] = None
    timeout: Annotated[
        Annotated[StrictInt, Field(gt=0)] | None,
        Field(description="Deadline in microseconds (Triton's unit)."),
        _says("parameter timeout must be a positive integer (microseconds)"),
    ] = None
    tile: Annotated[
        Annotated[StrictStr, Field(max_length=32)] | None,
        Field(description="off, auto, HxW or HxW:OVERLAP: how the output is cut into windows."),
        _says("parameter tile must be a string: off, auto, HxW or HxW:OVERLAP"),
    ] = None
    # tritonclient may send these; none changes a decode (binary_data_output picks the output form)
    binary_data_output: bool | None = None
    priority: int | None = None
    sequence_id: int | str | None = None
    sequence_start: bool | None = None
    sequence_end: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = set(data) - set(cls.model_fields)
            if unknown:
                raise _invalid(
                    f"unknown parameters {sorted(unknown)}; supported: steps, prompt, timeout, tile"
                )
        return data

    @property
    def timeout_s(self) -> float | None:
        return None if self.timeout is None else self.timeout / 1e6


class OutputParameters(BaseModel):
    binary_data: bool = False


class RequestedOutput(BaseModel):
    name: Annotated[Literal["image"], _says("the only output is 'image'; got {value}")]
    parameters: OutputParameters | None = None


# ---- the request ----------------------------------------------------------------------------------
class InferRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response.")
    parameters: InferParameters | None = None
    inputs: list[InferInput] = Field(max_length=3)
    outputs: list[RequestedOutput] | None = None

    @model_validator(mode="after")
    def _one_latent(self) -> InferRequest:
        names = [tensor.name for tensor in self.inputs]
        for name in dict.fromkeys(names):
            if names.count(name) > 1:
                raise _invalid(f"input {name!r} is given twice")
        if "latent" not in names:
            raise _invalid("the request needs an input named 'latent' (FP32 or FP16 [B, C, h, w])")
        return self

    @property
    def params(self) -> InferParameters:
        return self.parameters or InferParameters()

    @property
    def wants_binary(self) -> bool:
        """The image as binary data: the first requested output says so, else the request's parameter."""
        if self.outputs:
            return bool(self.outputs[0].parameters and self.outputs[0].parameters.binary_data)
        return bool(self.params.binary_data_output)

    def decode_request(self, tensors: dict[str, torch.Tensor]) -> DecodeRequest:
        """What the service decodes: the tensors, these parameters, the image as raw uint8 (TENSOR)."""
        params = self.params
        return DecodeRequest(
            latents=tensors["latent"].float(),
            sigmas=_per_sample(tensors.get("sigma")),
            seeds=_per_sample(tensors["seed"].to(torch.int64)) if "seed" in tensors else None,
            steps=params.steps,
            prompt=params.prompt,
            timeout_s=params.timeout_s,
            output_format=TENSOR,
            tile=params.tile,
        )

    def tensors(self, binary: bytes) -> dict[str, torch.Tensor]:
        """{name: tensor} of the inputs; the binary part must be claimed to its last byte."""
        tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for spec in self.inputs:
            array, offset = spec.array(binary, offset)
            tensors[spec.name] = torch.from_numpy(array)
        if offset != len(binary):
            raise unprocessable(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
        return tensors


def _per_sample(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1] -> [B]: Triton's clients send a per-sample scalar of dims [1] as [B, 1] (the model config
    declares it so, reshaped to [])."""
    if tensor is not None and tensor.ndim == 2 and tensor.shape[1] == 1:
        return tensor[:, 0]
    return tensor


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """(the request, the binary part): the JSON head and the tensor bytes after it."""
    if header_length is None:
        head, binary = body, b""
    else:
        length = ascii_integer(header_length)
        if length is None or length > len(body):
            raise bad_request(
                f"Inference-Header-Content-Length {header_length!r} must be the byte length of the JSON "
                f"header, at most the body's {len(body)} bytes"
            )
        head, binary = body[:length], body[length:]
    try:
        return InferRequest.model_validate_json(head), binary
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """One ApiError for all of a request's problems: 400 if the body is not the protocol's shape."""
    problems = [_problem(error) for error in exc.errors(include_url=False)]
    messages = list(dict.fromkeys(message for _, message in problems))
    if len(messages) > 5:
        messages = [*messages[:5], f"and {len(messages) - 5} more"]
    message = "; ".join(messages)
    return bad_request(message) if any(status == 400 for status, _ in problems) else unprocessable(message)


def _problem(error: Any) -> tuple[int, str]:
    kind, loc, given = error["type"], tuple(error["loc"]), error.get("input")
    if kind == "json_invalid":
        return 400, f"the inference request is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
    if loc in ((), ("inputs",)) and kind in ("model_type", "missing", "list_type"):
        return 400, 'the inference request must be a JSON object with an "inputs" list'
    if len(loc) == 2 and loc[0] == "inputs" and kind in ("dict_type", "model_type"):
        return 400, "each input must be an object with name, shape, datatype and data"
    if loc == ("parameters",) and kind in ("dict_type", "model_type"):
        return 400, '"parameters" must be an object'
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        name = given.get("name") if isinstance(given, dict) else None
        return 422, f"unknown input {name!r}; inputs are {INPUT_NAMES}"
    if kind == INVALID:
        return 422, error["msg"]
    got = f" (got {_short(given)})" if isinstance(given, str | int | float | bool) else ""
    return 422, f"{_where(loc)}: {error['msg']}{got}"


def _where(loc: tuple) -> str:
    """("inputs", 0, "latent", "shape", 1) -> "input 'latent' shape.1" (the union's tag is the name)."""
    if len(loc) >= 3 and loc[0] == "inputs":
        return " ".join([f"input {loc[2]!r}", ".".join(map(str, loc[3:]))]).strip()
    return ".".join(map(str, loc)) or "the request"


# The OpenAPI page's request body of the infer routes, and the schemas it refers to (app.py adds them
# to the page's components).
_REFS, _DEFS = models_json_schema([(InferRequest, "validation")], ref_template="#/components/schemas/{model}")
OPENAPI_SCHEMAS: dict[str, Any] = _DEFS["$defs"]
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON; with the binary data extension, the JSON head of "
        "Inference-Header-Content-Length bytes, then the tensors' bytes in input order.",
        "content": {"application/json": {"schema": _REFS[(InferRequest, "validation")]}},
    }
}
