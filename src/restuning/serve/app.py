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
from ..train.task_table import Query, TaskTable
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


@serve.deployment(ray_actor_options={"num_cpus": 0})
class BackboneServer:
    """One frozen backbone and the tasks on it. Startup tasks that fail to load are refused (reported by
    `describe`), and the others are served."""

    def __init__(self, backbone: str, tasks: dict[str, str], config: dict[str, Any], metrics):
        self.config = ServeConfig.from_dict(config)
        torch.set_num_threads(self.config.threads())  # Ray starts its workers with OMP_NUM_THREADS=1
        self.backbone = backbone
        self.metrics = metrics
        self.table = TaskTable(backbone, share_forward=self.config.share_forward)
        self.refused: dict[str, str] = {}
        for name, run in tasks.items():
            try:
                self.table.add(name, run)
            except RestuningError as err:
                self.refused[name] = str(err)
        self.answer_batch.set_max_batch_size(self.config.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(self.config.max_wait_ms / 1000)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "kind": self.table.kind,
                "tasks": {t["name"]: {**t, "kind": self.table.kind} for t in self.table.describe()},
                "refused": self.refused}

    def add_task(self, name: str, run: str) -> dict[str, Any]:
        """Load a task; a RestuningError (not finished, another backbone, damaged) leaves the table as it was."""
        return {**self.table.add(name, run).describe(), "kind": self.table.kind}

    async def predict(self, tasks: list[str], inputs: list, live: dict[str, str]) -> dict[str, Any]:
        return await self.answer_batch((tasks, inputs, live))

    def _sync(self, live: dict[str, str]) -> None:
        """Match the gateway's task table: drop the tasks it removed, load those another replica added."""
        for name in [n for n in self.table.names if live.get(n) != str(self.table.tasks[n].run.path)]:
            self.table.remove(name)
        for name, run in live.items():
            if name not in self.table.tasks:
                self.table.add(name, run)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(
        len(item[1]) for item in items))
    async def answer_batch(self, items: list[tuple[list[str], list, dict[str, str]]]) -> list[dict[str, Any]]:
        try:
            self._sync(items[-1][2])
        except RestuningError as err:
            return [{"error": f"a task failed to load on this replica: {err}"}] * len(items)
        queries = [Query(tasks, inputs) for tasks, inputs, _ in items]
        known = [all(t in self.table.tasks for t in q.tasks) for q in queries]
        before = self.table.forwards
        try:
            answers = iter(self.table.answer([q for q, ok in zip(queries, known) if ok]))
        except Exception as err:  # the whole batch fails alike (a bug, not a bad request); the replica serves on
            return [{"error": f"{type(err).__name__}: {err}"}] * len(items)
        results = []
        for query, ok in zip(queries, known):
            if not ok:
                missing = [t for t in query.tasks if t not in self.table.tasks]
                results.append({"error": f"task {missing[0]!r} was removed; tasks: {self.table.names}",
                                "status": 404})
                continue
            results.append({"replica": self.replica, "answers": {
                t: self._labelled(t, logits) for t, logits in next(answers).items()}})
        await self.metrics.record.remote(self.backbone, len(items), sum(len(q.inputs) for q in queries),
                                         self.table.forwards - before)
        return results

    def _labelled(self, task: str, logits: torch.Tensor) -> list[dict[str, Any]]:
        classes = self.table.tasks[task].run.classes
        probabilities = logits.float().softmax(-1).tolist()
        return [{"label": classes[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(classes, p))} for p in probabilities]


app = FastAPI(title="restuning serve", version="1",
              description="Many tasks on one frozen backbone: bypass tasks on one backbone share its forward.")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """The HTTP API. `backbones`: `{backbone: handle of its BackboneServer}`."""

    def __init__(self, backbones: dict[str, Any], config: dict[str, Any], metrics):
        self.config = ServeConfig.from_dict(config)
        self.handles = backbones
        self.metrics = metrics
        self.requests = RequestMetrics()
        self.tasks: dict[str, dict[str, Any]] = {}  # name -> description (with "backbone", "kind", "run")
        self.refused: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self._ready = asyncio.Lock()
        self._loaded = False

    async def _load(self) -> None:
        async with self._ready:
            if self._loaded:
                return
            for backbone, handle in self.handles.items():
                state = await handle.describe.remote()
                self.kinds[backbone] = state["kind"]
                self.tasks.update(state["tasks"])
                self.refused.update(state["refused"])
            self._loaded = True

    def _live(self, backbone: str) -> dict[str, str]:
        return {n: t["run"] for n, t in self.tasks.items() if t["backbone"] == backbone}

    def _authorised(self, request: Request) -> bool:
        if self.config.api_key is None:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.headers.get("x-api-key", "")
        return secrets.compare_digest(given.encode(), self.config.api_key.encode())

    async def _handle(self, route: str, request: Request, work) -> Response:
        start = time.perf_counter()
        try:
            if not self._authorised(request):
                raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
            await self._load()
            response = await work()
        except RequestError as err:
            response = JSONResponse({"error": err.message}, status_code=err.status)
        self.requests.observe(route, response.status_code, time.perf_counter() - start)
        return response

    async def _json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise RequestError(413, f"body of {declared} bytes; at most {self.config.max_body_bytes} (max_body_bytes)")
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            raise RequestError(413, f"body of {len(raw)} bytes; at most {self.config.max_body_bytes} (max_body_bytes)")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not JSON ({err})") from err

    # --- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        await self._load()
        return {"status": "ok", "tasks": len(self.tasks), "backbones": list(self.handles), "refused": self.refused}

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
            if name in self.tasks:
                raise RequestError(409, f"task {name!r} already exists; DELETE /v1/tasks/{name} first")
            try:
                backbone = open_run(run).config.backbone
            except RestuningError as err:
                raise RequestError(422, str(err)) from err
            if backbone not in self.handles:
                raise RequestError(422, f"run {run} is on backbone {backbone!r}; this service serves "
                                   f"{sorted(self.handles)} (start a service for that backbone)")
            try:
                task = await self.handles[backbone].add_task.remote(name, str(run))
            except RestuningError as err:
                raise RequestError(422, f"task {name!r} does not load: {err}") from err
            self.tasks[name] = task
            return JSONResponse(task, status_code=201)
        return await self._handle("/v1/tasks", request, work)

    @app.delete("/v1/tasks/{name}")
    async def delete_task(self, name: str, request: Request) -> Response:
        async def work():
            if name not in self.tasks:
                raise RequestError(404, f"no task {name!r}; tasks: {sorted(self.tasks)}")
            del self.tasks[name]  # each replica drops it before its next batch
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
        path = (root / run).resolve()
        if not path.is_relative_to(root):
            raise RequestError(403, f"run {run!r} is outside the task root {root}; runs are added from under it")
        return path
