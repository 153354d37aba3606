"""``hybridstack serve``: a FastAPI app over a loaded :class:`~hybridstack.predict.Predictor`.

Routes
------
``POST /predict``  ``{"rows": [{<text column>: ...}, ...]}`` -> ``{"predictions": [{
    "probabilities": {label: p}, "labels": [...], "thresholds": {label: t} | null}, ...]}``
    in the rows' order. Multilabel: the labels at or over their stored thresholds;
    multiclass and pairwise: the argmax label, thresholds null. Pairwise columns take a
    string (one turn) or a list of turns (strings or null), as the competition's JSON.
``POST /explain``  ``{"row": {...}, "top_k": 8}`` -> the predictor's explanation of one row.
``GET /health``    status and the micro-batching counters (requests, predictor calls).
``GET /info``      task, labels, models, metric, limits, library versions.

Bad requests never get a traceback: a missing column, a wrong type or an empty body is
422, more than ``max_rows`` rows or a text over ``max_chars`` characters is 413; each
answer is ``{"error": "<field>: <what is wrong>", "detail": [...]}``. Concurrent
``/predict`` requests are micro-batched (:class:`~hybridstack.live.batcher.MicroBatcher`),
scored on a worker thread, off the event loop.

fastapi and pydantic are imported by this module: import it only with the serve extra.
No ``from __future__ import annotations`` here: FastAPI reads the route annotations
(request models defined inside :func:`create_app`) at run time.
"""

import contextlib
import logging
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

import hybridstack
from hybridstack.errors import HybridstackError, one_line
from hybridstack.live import core
from hybridstack.live.batcher import DEFAULT_MAX_BATCH_ROWS, DEFAULT_WAIT_MS, MicroBatcher

if TYPE_CHECKING:
    from hybridstack.predict.predictor import Predictor

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 256
DEFAULT_MAX_CHARS = 20_000
MAX_TOP_K = 50
# the body is refused unread past this many bytes per allowed character (JSON escapes
# take up to 6 bytes a character, plus the keys and punctuation of each row)
_BYTES_PER_CHAR = 6
_BYTES_PER_ROW = 1024
_SERVED_VERSIONS = ("fastapi", "starlette", "pydantic", "uvicorn")


class PayloadTooLarge(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def row_model(predictor: "Predictor") -> type[BaseModel]:
    """The pydantic model of one input row: every text column required, with its type.

    Multilabel/multiclass columns are strings; pairwise columns a string (one turn) or a
    list of turns (strings or null). Other keys (an id, say) are ignored: answers come
    back in the rows' order.
    """
    pairwise = predictor.task.kind == "pairwise"
    column_type: Any = StrictStr | list[StrictStr | None] if pairwise else StrictStr
    fields = {f"col_{i}": (column_type, Field(..., alias=column))
              for i, column in enumerate(predictor.task.text_columns())}
    return create_model("Row", __config__=ConfigDict(extra="ignore", populate_by_name=False),
                        **fields)


def create_app(predictor: "Predictor", *, max_rows: int = DEFAULT_MAX_ROWS,
               max_chars: int = DEFAULT_MAX_CHARS, batch_wait_ms: float = DEFAULT_WAIT_MS,
               max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
               run_name: str | None = None) -> FastAPI:
    """The app; ``app.state.batcher.stats`` counts requests against predictor calls."""
    task = predictor.task
    columns = task.text_columns()
    pairwise = task.kind == "pairwise"
    Row = row_model(predictor)

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rows: list[Row] = Field(..., min_length=1)  # type: ignore[valid-type]

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        row: Row  # type: ignore[valid-type]
        top_k: int = Field(8, ge=1, le=MAX_TOP_K)

    def plain_rows(rows: list[BaseModel], where: str) -> list[dict[str, Any]]:
        """The rows as the predictor takes them; 413 for a text over ``max_chars``."""
        out = []
        for i, row in enumerate(rows):
            values = {}
            for j, column in enumerate(columns):
                value = getattr(row, f"col_{j}")
                if pairwise and isinstance(value, str):
                    value = [value]  # a plain string is one turn
                n_chars = len(value) if isinstance(value, str) else sum(len(t or "") for t in value)
                if n_chars > max_chars:
                    name = f"{where}.{i}.{column}" if where == "rows" else f"{where}.{column}"
                    raise PayloadTooLarge(name, f"{name}: {n_chars} characters, more than the "
                                                f"limit of {max_chars} (--max-chars)")
                values[column] = value
            out.append(values)
        return out

    batcher = MicroBatcher(predictor.predict_proba, wait_ms=batch_wait_ms,
                           max_rows=max(max_batch_rows, max_rows))
    max_body = max_rows * (max_chars * len(columns) * _BYTES_PER_CHAR + _BYTES_PER_ROW)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()  # its worker task and thread end with the server

    app = FastAPI(title=f"hybridstack: {run_name or predictor.ctx.dir.path.name}",
                  version=hybridstack.__version__, lifespan=lifespan,
                  description="Predictions of a finished hybridstack experiment.")
    app.state.predictor = predictor
    app.state.batcher = batcher

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return _error(413, "body", f"body: {int(length)} bytes is more than {max_body} "
                                       f"(--max-rows {max_rows} rows of --max-chars {max_chars})")
        return await call_next(request)

    @app.post("/predict")
    async def predict(request: PredictRequest) -> dict[str, Any]:
        if len(request.rows) > max_rows:
            raise PayloadTooLarge("rows", f"rows: {len(request.rows)} rows, more than the limit "
                                          f"of {max_rows} a request (--max-rows)")
        rows = plain_rows(request.rows, "rows")
        P = await batcher.submit(rows)
        return {"predictions": core.prediction_records(predictor, P)}

    @app.post("/explain")
    async def explain(request: ExplainRequest) -> dict[str, Any]:
        row = plain_rows([request.row], "row")[0]
        explained = (await batcher.run(predictor.explain, [row], request.top_k))[0]
        explained.pop("id", None)  # the row number 0: meaningless for one row
        return core.jsonable({**explained, "thresholds": core.thresholds_of(predictor)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "batching": batcher.enabled, **batcher.stats.as_dict()}

    info = _info(predictor, max_rows, max_chars, batcher)

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return info

    _add_error_handlers(app)
    return app


def _info(predictor: "Predictor", max_rows: int, max_chars: int,
          batcher: MicroBatcher) -> dict[str, Any]:
    from hybridstack.runs import read_json
    from hybridstack.versions import library_versions

    task = predictor.task
    stack_dir = predictor.ctx.dir.stack.path
    scores = read_json(stack_dir / "scores.json") if (stack_dir / "scores.json").is_file() else {}
    versions = library_versions()
    for name in _SERVED_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions.setdefault("python", platform.python_version())
    return core.jsonable({
        "experiment": predictor.ctx.dir.path.name,
        "task": {"kind": task.kind, "text_columns": task.text_columns(),
                 "id_column": task.cfg.id_column},
        "labels": list(predictor.label_names),
        "multilabel": predictor.multilabel,
        "thresholds": core.thresholds_of(predictor),
        "models": [m.name for m in predictor.base_models],
        "stack": {"method": predictor.weights.get("method"), "kind": predictor.weights.get("kind"),
                  "weights": predictor.weights.get("weights")},
        "metric": {"name": scores.get("metric_name"), "cv": scores.get("overall"),
                   "rows_validated": scores.get("rows_validated"),
                   "greater_is_better": scores.get("greater_is_better")},
        "limits": {"max_rows": max_rows, "max_chars": max_chars,
                   "batch_wait_ms": batcher.wait_s * 1000, "max_batch_rows": batcher.max_rows},
        "versions": versions,
    })


# -- errors: JSON, one line naming the field, never a traceback ---------------------------------


def _error(status: int, field: str | None, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": one_line(message)}
    if field is not None:
        body["field"] = field
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(status_code=status, content=body)


def _field_name(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        detail = [{"field": _field_name(e.get("loc", ())), "message": e.get("msg", ""),
                   "type": e.get("type", "")} for e in errors]  # no "input": texts can be long
        for entry, e in zip(detail, errors):
            if entry["type"] == "missing" and entry["field"] == "body":
                entry["message"] = "the request has no JSON body"
            elif entry["type"] == "json_invalid":
                entry["message"] = f"invalid JSON ({e.get('ctx', {}).get('error', 'cannot parse')})"
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail[:5])
        if len(detail) > 5:
            message += f"; and {len(detail) - 5} more"
        return _error(422, detail[0]["field"] if detail else None, message or "invalid request",
                      detail)

    @app.exception_handler(PayloadTooLarge)
    async def too_large(request: Request, exc: PayloadTooLarge) -> JSONResponse:
        return _error(413, exc.field, str(exc))

    @app.exception_handler(HybridstackError)
    async def unusable_rows(request: Request, exc: HybridstackError) -> JSONResponse:
        return _error(422, None, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, None, f"{request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)  # the server's log only
        return _error(500, None, f"internal error ({type(exc).__name__}); the server log has "
                                 "the details")
