"""The Ray Serve application: a FastAPI gateway, one deployment per backbone, and a metrics store.

    client ──HTTP──▶ Gateway (FastAPI ingress: checks, auth, routing, request metrics)
                         │  one handle per backbone
                         ▼
                 BackboneServer × replicas   (@serve.batch: requests for any of its tasks that arrive
                         │                    within max_wait_ms share one backbone forward)
                         ▼
                 BatchMetrics store (batch sizes, backbone forwards)

Ray Serve's model multiplexing would split batches by model id and so defeat the shared forward: here a
deployment is a backbone and its tasks are rows of one batch. The gateway owns the task table (`{name: run
folder}` per backbone) and sends it with every request, so each replica adds or drops tasks to match it
before it answers: a task added at run time reaches every replica without a restart.
"""


import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from ..errors import RestuningError
from ..train.finished import open_run
from ..train.task_table import Query, TaskTable, valid_task_name
from .config import ServeConfig
from .metrics import BatchMetrics, RequestMetrics
from .requests import Predict, RequestError, parse_predict


class PredictBody(BaseModel):
    """`task` (one name) or `tasks` (several, answered from one backbone forward), and the inputs: texts, or
    base64-encoded image files (optionally as data URLs)."""

    task: str | None = None
    tasks: list[str] | None = None
    inputs: list[str] = Field(description="texts, or base64-encoded images")


class TaskBody(BaseModel):
    """A finished run (a folder under the service's task root) to serve as task `name`."""

    name: str
    run: str


@serve.deployment(ray_actor_options={"num_cpus": 0})
class MetricsStore:
    """Where the backbone replicas record their batches, for the gateway's `/metrics`."""

    def __init__(self):
        self.batches = BatchMetrics()

    def record(self, backbone: str, requests: int, inputs: int, forwards: int) -> None:
        self.batches.record(backbone, requests, inputs, forwards)

    def export(self) -> bytes:
        return self.batches.export()


def reason(err: BaseException) -> str:
    """An error's own message: the cause of an error that crossed from a Ray replica, without its traceback."""
    err = getattr(err, "cause", None) or err
    if isinstance(err, RestuningError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


Live = tuple[int, dict[str, str]]  # (version, {task: run folder}) of the gateway's task table


@serve.deployment(ray_actor_options={"num_cpus": 0})
class BackboneServer:
    """One frozen backbone and the tasks on it. Startup tasks that fail to load are refused (reported by
    `describe`), and the others are served.

    Every request carries the gateway's task table with its version; a replica that sees a newer version
    than its own drops the tasks the gateway removed and loads those added through another replica. A task
    that fails to load here is remembered (not retried until its folder changes) and only the requests that
    ask it are refused. All methods are coroutines, so table changes and batches never interleave.
    """

    def __init__(self, backbone: str, tasks: dict[str, str], config: dict[str, Any], metrics):
        self.config = ServeConfig.from_dict(config)
        torch.set_num_threads(self.config.threads())  # Ray starts its workers with OMP_NUM_THREADS=1
        self.backbone = backbone
        self.metrics = metrics
        self.table = TaskTable(backbone, share_forward=self.config.share_forward)
        self.refused: dict[str, str] = {}
        self.failed: dict[str, tuple[str, str]] = {}  # task -> (run folder, why) of loads that failed here
        self.version = 0
        for name, run in tasks.items():
            try:
                self.table.add(name, run)
            except Exception as err:  # a task that cannot load is refused; the others are served
                self.refused[name] = reason(err)
        self.answer_batch.set_max_batch_size(self.config.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(self.config.max_wait_ms / 1000)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def describe(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "kind": self.table.kind,
                "tasks": {t["name"]: {**t, "kind": self.table.kind} for t in self.table.describe()},
                "refused": self.refused}

    async def add_task(self, name: str, run: str, live: Live) -> dict[str, Any]:
        """Load a task onto the table of version `live` (which lacks it); on success this replica is at the
        next version. `{"task": description}` or `{"error": why, "status": 422}`; the table is unchanged then."""
        self._sync(live)
        try:
            task = self.table.add(name, run)
        except Exception as err:  # not finished, another backbone or input size, a damaged checkpoint
            return {"error": f"task {name!r} does not load: {reason(err)}", "status": 422}
        self.version = live[0] + 1
        return {"task": {**task.describe(), "kind": self.table.kind}}

    async def predict(self, tasks: list[str], inputs: list, live: Live) -> dict[str, Any]:
        return await self.answer_batch((tasks, inputs, live))

    def _sync(self, live: Live) -> None:
        """Match the gateway's table of `live` if it is newer than this replica's."""
        version, runs = live
        if version <= self.version:
            return
        for name in [n for n in self.table.names if runs.get(n) != str(self.table.tasks[n].run.path)]:
            self.table.remove(name)
        for name, run in runs.items():
            if name in self.table.tasks or self.failed.get(name, ("",))[0] == run:
                continue
            try:
                self.table.add(name, run)
                self.failed.pop(name, None)
            except Exception as err:  # remembered: the requests for it are refused, the others answered
                self.failed[name] = (run, reason(err))
        self.version = version

    def _unavailable(self, tasks: list[str]) -> dict[str, Any] | None:
        for t in tasks:
            if t in self.failed:
                return {"error": f"task {t!r} failed to load on this replica: {self.failed[t][1]}", "status": 503}
            if t not in self.table.tasks:
                return {"error": f"no task {t!r} (removed); tasks: {self.table.names}", "status": 404}
        return None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(
        len(item[1]) for item in items))
    async def answer_batch(self, items: list[tuple[list[str], list, Live]]) -> list[dict[str, Any]]:
        self._sync(max((item[2] for item in items), key=lambda live: live[0]))
        refused = [self._unavailable(tasks) for tasks, _, _ in items]
        queries = [Query(tasks, inputs) for (tasks, inputs, _), no in zip(items, refused) if no is None]
        before = self.table.forwards
        try:
            answers = iter(self.table.answer(queries))
        except Exception as err:  # a bug rather than a bad request: this batch fails alike, the replica serves on
            return [no or {"error": f"the batch failed: {reason(err)}", "status": 500} for no in refused]
        results = []
        for no in refused:
            results.append(no or {"replica": self.replica, "answers": {
                t: self._labelled(t, logits) for t, logits in next(answers).items()}})
        if queries:
            try:
                await self.metrics.record.remote(self.backbone, len(queries), sum(len(q.inputs) for q in queries),
                                                 self.table.forwards - before)
            except Exception:  # metrics must never cost an answer
                pass
        return results

    def _labelled(self, task: str, logits: torch.Tensor) -> list[dict[str, Any]]:
        classes = self.table.tasks[task].run.classes
        probabilities = logits.float().softmax(-1).tolist()
        return [{"label": classes[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(classes, p, strict=True))} for p in probabilities]


app = FastAPI(title="restuning serve", version="1",
              description="Many tasks on one frozen backbone: bypass tasks on one backbone share its forward.")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """The HTTP API. `backbones`: `{backbone: handle of its BackboneServer}`; `refused`: `{task: why}` of the
    runs refused before any replica started. The gateway owns the task table and its version."""

    def __init__(self, backbones: dict[str, Any], config: dict[str, Any], metrics, refused: dict[str, str]):
        self.config = ServeConfig.from_dict(config)
        self.handles = backbones
        self.metrics = metrics
        self.requests = RequestMetrics()
        self.tasks: dict[str, dict[str, Any]] = {}  # name -> description (with "backbone", "kind", "run")
        self.refused: dict[str, str] = dict(refused)
        self.version = 0
        self._changes = asyncio.Lock()  # one add or delete at a time: versions and names stay consistent
        self._ready = asyncio.Lock()
        self._loaded = False

    async def _load(self) -> None:
        async with self._ready:
            if self._loaded:
                return
            for handle in self.handles.values():
                state = await handle.describe.remote()
                self.tasks.update(state["tasks"])
                self.refused.update(state["refused"])
            self._loaded = True

    def _live(self, backbone: str) -> tuple[int, dict[str, str]]:
        return self.version, {n: t["run"] for n, t in self.tasks.items() if t["backbone"] == backbone}

    def _authorised(self, request: Request) -> bool:
        if self.config.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        return secrets.compare_digest(given.encode(), self.config.api_key.encode())

    async def _handle(self, route: str, request: Request, work) -> Response:
        start = time.perf_counter()
        response = None
        try:
            if not self._authorised(request):
                raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer <key>' or "
                                   "'X-API-Key: <key>')")
            await self._load()
            response = await work()
        except RequestError as err:
            response = JSONResponse({"error": err.message}, status_code=err.status)
        except Exception as err:  # a replica that died, a bug: a JSON 500, and the service serves on
            response = JSONResponse({"error": reason(err)}, status_code=500)
        finally:
            self.requests.observe(route, response.status_code if response is not None else 500,
                                  time.perf_counter() - start)
        return response

    async def _json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"body of {declared} bytes; at most {limit} (max_body_bytes)")
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body without a length stops at the limit too
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, f"body over {limit} bytes (max_body_bytes)")
        try:
            return json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise RequestError(400, f"the body is not JSON ({type(err).__name__}: {str(err)[:200]})") from err

    async def state(self) -> dict[str, Any]:
        """What is served and what was refused, with why (for `start`; `/v1/tasks` shows the same)."""
        await self._load()
        return {"tasks": self.tasks, "refused": self.refused}

    # --- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        await self._load()
        return {"status": "ok", "tasks": len(self.tasks), "backbones": list(self.handles),
                "refused": sorted(self.refused)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(self, request: Request) -> Response:
        async def work():
            batches = await self.metrics.export.remote()
            return PlainTextResponse((self.requests.export() + batches).decode(),
                                     media_type="text/plain; version=0.0.4")
        return await self._handle("/metrics", request, work)

    @app.get("/v1/tasks")
    async def list_tasks(self, request: Request) -> Response:
        async def work():
            return JSONResponse({"tasks": list(self.tasks.values()), "refused": self.refused})
        return await self._handle("/v1/tasks", request, work)

    @app.post("/v1/tasks", status_code=201, openapi_extra={"requestBody": {"content": {"application/json": {
        "schema": TaskBody.model_json_schema()}}, "required": True}})
    async def add_task(self, request: Request) -> Response:
        async def work():
            body = await self._json(request)
            if not isinstance(body, dict) or set(body) != {"name", "run"} or not all(
                    isinstance(v, str) for v in body.values()):
                raise RequestError(400, "expected {\"name\": <task name>, \"run\": <run folder>}")
            name, run = body["name"], self._under_root(body["run"])
            if not valid_task_name(name):
                raise RequestError(400, f"task name {name!r}: expected a non-empty name without '.' or '/'")
            async with self._changes:
                if name in self.tasks:
                    raise RequestError(409, f"task {name!r} already exists; DELETE /v1/tasks/{name} first")
                try:
                    backbone = open_run(run).config.backbone
                except RestuningError as err:
                    raise RequestError(422, str(err)) from err
                if backbone not in self.handles:
                    raise RequestError(422, f"run {run} is on backbone {backbone!r}; this service serves "
                                       f"{sorted(self.handles)} (start a service for that backbone)")
                added = await self.handles[backbone].add_task.remote(name, str(run), self._live(backbone))
                if "error" in added:
                    raise RequestError(added["status"], added["error"])
                self.tasks[name] = added["task"]
                self.version += 1
            return JSONResponse(added["task"], status_code=201)
        return await self._handle("/v1/tasks", request, work)

    @app.delete("/v1/tasks/{name}")
    async def delete_task(self, name: str, request: Request) -> Response:
        async def work():
            async with self._changes:
                if name not in self.tasks:
                    raise RequestError(404, f"no task {name!r}; tasks: {sorted(self.tasks)}")
                del self.tasks[name]  # each replica drops it before its next batch
                self.version += 1
            return JSONResponse({"deleted": name})
        return await self._handle("/v1/tasks/{name}", request, work)

    @app.post("/v1/predict", openapi_extra={"requestBody": {"content": {"application/json": {
        "schema": PredictBody.model_json_schema()}}, "required": True}})
    async def predict(self, request: Request) -> Response:
        async def work():
            query: Predict = parse_predict(await self._json(request), self.tasks, self.config)
            self.requests.inputs.observe(len(query.inputs))
            result = await self.handles[query.backbone].predict.remote(query.tasks, query.inputs,
                                                                       self._live(query.backbone))
            if "error" in result:
                raise RequestError(result.get("status", 500), result["error"])
            return JSONResponse({"tasks": result["answers"]}, headers={"x-restuning-replica": result["replica"]})
        return await self._handle("/v1/predict", request, work)

    def _under_root(self, run: str) -> Path:
        root = self.config.root
        try:
            path = (root / run).resolve()  # symbolic links followed: one that leads out is refused below
        except (ValueError, OSError) as err:
            raise RequestError(400, f"run {run!r}: not a usable path ({err})") from err
        if not path.is_relative_to(root):
            raise RequestError(403, f"run {run!r} is outside the task root {root}; runs are added from under it")
        return path
