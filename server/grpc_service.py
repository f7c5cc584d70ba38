"""KServe v2 over gRPC (`--grpc-port`; off unless set), beside the HTTP routes and sharing everything with
them: the same DecodeService (limits, batcher, deadlines), the API key (`authorization: Bearer <key>`
metadata), the metrics (pidserve_requests_total{route="grpc:<method>"}), the documents (triton.py).

The protocol is the generated service of the `tritonclient[grpc]` package (grpc_service.proto, as
Triton ships it): this module implements its servicer, never the wire format.

    ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics
    ModelInfer  inputs as raw_input_contents or typed contents -> kserve_models.InferRequest (the HTTP
                route's validation) -> DecodeService.decode -> the image as raw_output_contents

Errors: the HTTP status of the same failure, as its gRPC code (STATUS_CODES), with the same message.
Messages up to the largest allowed request and response are accepted (`message_limit`); beyond,
gRPC itself answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.json_format import ParseDict
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc

from pidserve import __version__

from . import triton
from .errors import ApiError
from .kserve_models import InferRequest, validation_error

if TYPE_CHECKING:
    from .loader import ModelLoader
    from .metrics import Metrics
    from .service import DecodeService

log = logging.getLogger(__name__)

# The HTTP status of a failure -> its gRPC status code.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Typed contents field of each datatype the inputs accept.
CONTENTS = {"FP32": "fp32_contents", "FP16": None, "INT64": "int64_contents", "INT32": "int_contents"}


def message_limit(max_body_bytes: int, max_output_pixels: int) -> int:
    """The largest gRPC message: the HTTP body limit in, the largest allowed image batch (uint8 RGB) out,
    plus room for the protobuf framing."""
    return max(max_body_bytes, 3 * max_output_pixels) + (1 << 20)


class InferenceServicer(rpc.GRPCInferenceServiceServicer):
    def __init__(self, loader: ModelLoader, service: DecodeService, api_key: bytes | None) -> None:
        self.loader = loader
        self.service = service
        self.api_key = api_key
        self.metrics: Metrics = loader.metrics

    # ---- health and documents ----
    async def ServerLive(self, request, context):
        return await self._answer(
            "ServerLive", context, lambda: pb.ServerLiveResponse(live=self.loader.state != "failed")
        )

    async def ServerReady(self, request, context):
        return await self._answer(
            "ServerReady", context, lambda: pb.ServerReadyResponse(ready=self.loader.ready)
        )

    async def ModelReady(self, request, context):
        def ready():  # another model or version is simply not ready (HTTP: 404, which clients read so)
            served = request.name == self.loader.name and request.version in ("", triton.VERSION)
            return pb.ModelReadyResponse(ready=served and self.loader.ready)

        return await self._answer("ModelReady", context, ready)

    async def ServerMetadata(self, request, context):
        return await self._answer(
            "ServerMetadata",
            context,
            lambda: pb.ServerMetadataResponse(
                name="pidserve", version=__version__, extensions=triton.EXTENSIONS
            ),
        )

    async def ModelMetadata(self, request, context):
        def metadata():
            self._check_model(request.name, request.version)
            document = triton.model_metadata(self.loader)
            for tensor in document["inputs"]:
                tensor.pop("optional", None)  # not a field of the protobuf message
            return ParseDict(document, pb.ModelMetadataResponse())

        return await self._answer("ModelMetadata", context, metadata)

    async def ModelConfig(self, request, context):
        def config():
            self._check_model(request.name, request.version)
            return pb.ModelConfigResponse(
                config=ParseDict(triton.model_config(self.loader), model_config_pb2.ModelConfig())
            )

        return await self._answer("ModelConfig", context, config)

    async def ModelStatistics(self, request, context):
        def statistics():
            if request.name:
                self._check_model(request.name, request.version)
            return ParseDict(triton.model_stats(self.loader), pb.ModelStatisticsResponse())

        return await self._answer("ModelStatistics", context, statistics)

    # ---- inference ----
    async def ModelInfer(self, request, context):
        started = time.monotonic()
        status = 200
        try:
            self._authorize(context)
            self._check_model(request.model_name, request.model_version)
            self.service.require_ready()
            with self.metrics.parse_seconds.time():
                infer_request, tensors = _parse(request)
            outcome = await self.service.decode(infer_request.decode_request(tensors))
            output = pb.ModelInferResponse.InferOutputTensor(
                name="image", datatype="UINT8", shape=list(outcome.shape)
            )
            return pb.ModelInferResponse(
                model_name=self.loader.name,
                model_version=triton.VERSION,
                id=request.id,
                outputs=[output],
                raw_output_contents=[outcome.bodies[0]],
            )
        except ApiError as exc:
            status = exc.status
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)
        except Exception:
            status = 500
            log.exception("unhandled error in gRPC ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
        finally:
            self.metrics.requests.labels("grpc:ModelInfer", str(status)).inc()
            self.metrics.request_seconds.labels("grpc:ModelInfer").observe(time.monotonic() - started)

    # ---- shared ----
    async def _answer(self, method: str, context, build):
        """Run `build` (auth first), count it, and turn an ApiError into its gRPC status."""
        status = 200
        try:
            if method not in ("ServerLive", "ServerReady"):  # the probes stay open, as over HTTP
                self._authorize(context)
            return build()
        except ApiError as exc:
            status = exc.status
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)
        finally:
            self.metrics.requests.labels(f"grpc:{method}", str(status)).inc()

    def _authorize(self, context) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, given = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key):
            raise ApiError(401, "this server needs an API key: send metadata 'authorization: Bearer <key>'")

    def _check_model(self, name: str, version: str) -> None:
        if name != self.loader.name or version not in ("", triton.VERSION):
            which = name if not version else f"{name} version {version}"
            raise ApiError(
                404,
                f"unknown model '{which}'; this server serves '{self.loader.name}' version {triton.VERSION}",
            )


def _parse(request) -> tuple[InferRequest, dict]:
    """The protobuf request as the HTTP route's InferRequest (one validation for both protocols)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ApiError(
            400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input"
        )
    inputs, binary = [], []
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[index])}
            binary.append(raw[index])
        else:
            field = CONTENTS.get(tensor.datatype)
            if field is None:
                raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} needs raw_input_contents")
            entry["data"] = list(getattr(tensor.contents, field))
        inputs.append(entry)
    document: dict[str, Any] = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    params = {key: _parameter(value) for key, value in request.parameters.items()}
    if params:
        document["parameters"] = params
    try:
        infer_request = InferRequest.model_validate(document)
    except Exception as exc:  # pydantic's ValidationError, said as the HTTP route says it
        raise validation_error(exc) from None
    return infer_request, infer_request.tensors(b"".join(binary))


def _parameter(value) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


async def start_grpc_server(
    loader: ModelLoader, service: DecodeService, api_key: bytes | None, host: str, port: int
):
    """The gRPC server on host:port, started; the caller stops it (`await server.stop(grace)`)."""
    limits = loader.settings.request_limits()
    size = message_limit(loader.settings.max_body_bytes, limits.output_pixels)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    )
    rpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(loader, service, api_key), server)
    address = f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}; choose another --grpc-port")
    await server.start()
    log.info("KServe v2 gRPC on %s", address)
    return server
