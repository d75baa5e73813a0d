"""`restuning serve`: the task table it answers with, its request checks, and the Ray Serve service itself,
started on 127.0.0.1 by the tests (one service for the module, plus one with two replicas)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit_folder

from restuning.config import from_dict
from restuning.errors import CheckpointError, ConfigError
from restuning.serve import RequestError, ServeConfig, parse_predict
from restuning.train.config import TrainConfig
from restuning.train.predict import predict, predict_logits
from restuning.train.task_table import Query, TaskTable
from restuning.train.trainer import Trainer

TEXTS = ["what a lovely day", "this is the worst service ever", "I am so happy for you", "ugh, traffic again",
         "thanks, that helped a lot", "terrible, just terrible", "best concert of my life", "I hate mondays"]
MINILM = "all-MiniLM-L6-v2"
KEY = "test-key"
pytestmark = pytest.mark.xdist_group("serve")  # one worker starts the services, one after the other


def _train(out: Path, method: str, backbone: str = MINILM, seed: int = 0) -> Path:
    text = backbone == MINILM
    data = ({"name": "tweets", "train_size": 48, "test_size": 16, "max_length": 24} if text else
            {"name": "mnist", "train_size": 48, "test_size": 16, "image_size": 16})
    config = from_dict(TrainConfig, {"backbone": backbone, "method": {"name": method}, "data": data, "seed": seed,
                                     "optim": {"epochs": 1, "batch_size": 16, "lr": 0.01}, "output_dir": str(out)})
    Trainer(config, progress=False).run()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    found = {f"b{s}": _train(root / "tasks" / f"b{s}", "bypass", seed=s) for s in range(4)}
    found["rt"] = _train(root / "tasks" / "rt", "restuning")
    found["img"] = _train(root / "tasks" / "img", "bypass", backbone=str(tiny_vit_folder(root)))
    found["later"] = _train(root / "tasks" / "later", "bypass", seed=7)
    damaged = root / "tasks" / "damaged"
    shutil.copytree(found["b0"], damaged)
    weights = next((damaged / "final").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    found["damaged"] = damaged
    (root / "tasks" / "unfinished").mkdir()
    found["unfinished"] = root / "tasks" / "unfinished"
    (root / "elsewhere").mkdir()
    (root / "tasks" / "escape").symlink_to(root / "elsewhere")
    found["outside"] = _train(root / "elsewhere", "bypass", seed=3)
    return found


# --- the task table (no service) -----------------------------------------------------------------
def test_table_routes_each_sample_to_its_tasks_with_one_shared_forward(runs):
    table = TaskTable(MINILM)
    for name in ("b0", "b1", "rt"):
        table.add(name, runs[name])
    backbone = {k: v.clone() for k, v in table.backbone.model.state_dict().items()}
    queries = [Query(["b0"], TEXTS[:2]), Query(["b1", "b0"], TEXTS[2:5]), Query(["b1"], TEXTS[5:6])]
    answers = table.answer(queries)
    assert table.forwards == 1  # three queries, two bypass tasks: one backbone forward
    for query, answer in zip(queries, answers):
        assert list(answer) == query.tasks
        for task in query.tasks:
            (alone,) = table.answer([Query([task], query.inputs)])
            torch.testing.assert_close(answer[task], alone[task], atol=1e-5, rtol=0)
    before = table.forwards
    table.answer([Query(["rt", "b0"], TEXTS[:3])])
    assert table.forwards - before == 2  # the shared forward, and Res-Tuning's own
    table.add("b2", runs["b2"])
    table.remove("b1")
    assert table.names == ["b0", "rt", "b2"]
    for k, v in table.backbone.model.state_dict().items():
        assert torch.equal(v, backbone[k]), f"{k} changed when tasks came and went"


def test_table_answers_equal_predict_and_per_task_forwards(runs):
    table = TaskTable(MINILM, share_forward=False)
    table.add("b0", runs["b0"])
    table.add("b1", runs["b1"])
    (answer,) = table.answer([Query(["b0", "b1"], TEXTS)])
    assert table.forwards == 2
    expected = {str(run.path): logits for run, logits in predict_logits([runs["b0"], runs["b1"]], texts=TEXTS)}
    torch.testing.assert_close(answer["b0"], expected[str(runs["b0"])], atol=1e-5, rtol=0)
    torch.testing.assert_close(answer["b1"], expected[str(runs["b1"])], atol=1e-5, rtol=0)


def test_table_refuses_what_it_cannot_serve_and_stays_as_it_was(runs):
    table = TaskTable(MINILM)
    table.add("b0", runs["b0"])
    with pytest.raises(ConfigError, match="trained on backbone .*tiny-vit.*serves 'all-MiniLM-L6-v2'"):
        table.add("img", runs["img"])
    with pytest.raises(CheckpointError):
        table.add("damaged", runs["damaged"])
    with pytest.raises(ConfigError, match="already exists"):
        table.add("b0", runs["b1"])
    with pytest.raises(ConfigError, match="reads texts"):
        table.answer([Query(["b0"], [torch.zeros(3, 8, 8)])])
    assert table.names == ["b0"] and table.answer([Query(["b0"], TEXTS[:1])])[0]["b0"].shape == (1, 2)
    assert table.answer([]) == [] and table.forwards == 1


# --- request checks (no service) -----------------------------------------------------------------
SERVED = {"t": {"backbone": "text-bb", "kind": "text"}, "i": {"backbone": "image-bb", "kind": "image"}}


def _png(size: int = 12) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("body,status,message", [
    ([], 400, "expected a JSON object"),
    ({"task": "t"}, 400, "'inputs': expected a non-empty list of texts"),
    ({"task": "t", "tasks": ["t"], "inputs": ["a"]}, 400, "either 'task'"),
    ({"task": "nope", "inputs": ["a"]}, 404, r"unknown task 'nope'; tasks: \['i', 't'\]"),
    ({"tasks": ["t", "i"], "inputs": ["a"]}, 400, "different backbones"),
    ({"task": "t", "inputs": ["a"] * 5}, 413, "5 inputs in one request; at most 4"),
    ({"task": "t", "inputs": ["a" * 101]}, 413, "101 characters; at most 100"),
    ({"task": "t", "inputs": [3]}, 400, "expected strings"),
    ({"task": "t", "inputs": ["data:image/png;base64," + _png()]}, 400, "an image, sent to a text task"),
    ({"task": "i", "inputs": ["a nice day"]}, 400, "not a readable image.*did you send text to an image task"),
    ({"task": "i", "inputs": ["a nice day!"]}, 400, "not base64.*did you send text to an image task"),
    ({"task": "i", "inputs": [base64.b64encode(b"not an image at all").decode()]}, 400, "not a readable image"),
    ({"task": "t", "inputs": ["a"], "extra": 1}, 400, r"unknown keys \['extra'\]"),
])
def test_bad_requests_get_a_clear_4xx(body, status, message):
    config = ServeConfig(max_inputs=4, max_text_chars=100)
    with pytest.raises(RequestError, match=message) as err:
        parse_predict(body, SERVED, config)
    assert err.value.status == status


def test_images_arrive_as_tensors_base64_or_data_urls():
    wrapped = "\n".join(_png(9)[i:i + 76] for i in range(0, len(_png(9)), 76))  # as `base64` wraps its lines
    query = parse_predict({"task": "i", "inputs": [_png(12), "data:image/png;base64," + _png(9), wrapped]}, SERVED,
                          ServeConfig())
    assert [tuple(x.shape) for x in query.inputs] == [(3, 12, 12), (3, 9, 9), (3, 9, 9)]
    assert abs(query.inputs[0][0, 0, 0].item() - 200 / 255) < 1e-6
    sized = {"i": {**SERVED["i"], "image_size": 8}}  # resized at the gateway to the task's size
    assert [tuple(x.shape) for x in parse_predict({"task": "i", "inputs": [_png(12)]}, sized, ServeConfig()).inputs
            ] == [(3, 8, 8)]
    with pytest.raises(RequestError, match=r"12 x 12 pixels; at most 100 \(max_image_pixels\)") as err:
        parse_predict({"task": "i", "inputs": [_png(12)]}, SERVED, ServeConfig(max_image_pixels=100))
    assert err.value.status == 413


def test_serve_config_checks_its_runs_and_limits():
    with pytest.raises(ConfigError, match="api_key: an empty key"):
        ServeConfig(api_key=" ")
    with pytest.raises(ConfigError, match="max_inputs .* must not exceed max_batch_size"):
        ServeConfig(max_inputs=10, max_batch_size=5)
    with pytest.raises(ConfigError, match=r"task names \['run'\] given twice"):
        ServeConfig(runs=["a/run", "b/run"])
    assert ServeConfig(torch_threads=3).threads() == 3 and ServeConfig(replica_cpus=2, replicas=4).threads() == 2
    assert ServeConfig(runs=["x=a/run", "b/run"]).named_runs() == {"x": Path("a/run"), "run": Path("b/run")}


def test_cli_serve_reads_flags_over_the_yaml(tmp_path, monkeypatch):
    from restuning import cli, serve

    class Started(Exception):
        pass

    def fake_start(config):
        seen["config"] = config
        raise Started

    seen = {}
    monkeypatch.setattr(serve, "start", fake_start)
    (tmp_path / "serve.yaml").write_text("runs: [a/x]\nport: 9000\nmax_wait_ms: 5\n")
    with pytest.raises(Started):
        cli.main(["serve", "--config", str(tmp_path / "serve.yaml"), "--port", "9001", "--set", "replicas=2"])
    config = seen["config"]
    assert (config.runs, config.port, config.max_wait_ms, config.replicas, config.host) == (
        ["a/x"], 9001, 5.0, 2, "127.0.0.1")


def test_without_runs_the_demo_runs_are_served_or_the_error_says_what_to_do(tmp_path, monkeypatch, runs):
    from restuning.serve.service import demo_runs, start

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no runs given and no finished demo runs in runs/demo.*restuning demo"):
        start(ServeConfig())
    (tmp_path / "runs" / "demo" / "quick").mkdir(parents=True)
    shutil.copytree(runs["b0"], tmp_path / "runs" / "demo" / "quick" / "minilm-bypass")
    (tmp_path / "runs" / "demo" / "unfinished").mkdir()
    assert demo_runs() == ["runs/demo/quick/minilm-bypass"]


# --- the service ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, url: str, key: str | None = KEY):
        import requests

        self.url, self.session, self.key = url, requests.Session(), key

    def __call__(self, method: str, path: str, body=None, raw: bytes | None = None, key: str | None = None):
        headers = {"Authorization": f"Bearer {key or self.key}"} if (key or self.key) else {}
        return self.session.request(method, self.url + path, json=body, data=raw, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def service(runs):
    from restuning.serve.service import start, stop

    port = _free_port()
    root = runs["b0"].parent
    config = ServeConfig(runs=[str(runs[n]) for n in ("b0", "b1", "b2", "b3", "rt", "img", "damaged", "unfinished")],
                         port=port, task_root=str(root), api_key=KEY, max_batch_size=8, max_inputs=8,
                         max_wait_ms=1000, max_body_bytes=64 * 1024)
    info = start(config)
    try:
        yield info, Client(info["url"])
    finally:
        stop()


def _probabilities(answer, task: str) -> torch.Tensor:
    assert answer.status_code == 200, answer.text
    return torch.tensor([list(p["probabilities"].values()) for p in answer.json()["tasks"][task]])


def _expected(run: Path, texts: list[str] = TEXTS) -> torch.Tensor:
    ((_, logits),) = list(predict_logits([run], texts=texts))
    return logits.softmax(-1)


def _forwards(client: Client) -> float:
    text = client("GET", "/metrics").text
    found = re.search(r'^restuning_backbone_forwards_total\{backbone="all-MiniLM-L6-v2"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_service_lists_its_tasks_and_refuses_the_damaged_one(service, runs):
    info, client = service
    assert info["url"].startswith("http://127.0.0.1:")
    assert "damaged" in info["refused"] and "damaged" not in info["backbones"][MINILM]
    listed = client("GET", "/v1/tasks").json()
    tasks = {t["name"]: t for t in listed["tasks"]}
    assert sorted(tasks) == ["b0", "b1", "b2", "b3", "img", "rt"]
    assert tasks["b0"]["backbone"] == MINILM and tasks["b0"]["classes"] == ["negative", "positive"]
    assert tasks["b0"]["shared_forward"] and not tasks["rt"]["shared_forward"]
    assert tasks["img"]["kind"] == "image" and len(tasks["img"]["classes"]) == 10
    assert "does not load" in listed["refused"]["damaged"] and "Traceback" not in listed["refused"]["damaged"]
    assert "not a finished run" in listed["refused"]["unfinished"]
    health = Client(client.url, key=None)("GET", "/health").json()  # open, and names without reasons
    assert health["status"] == "ok" and health["refused"] == ["damaged", "unfinished"]
    assert "/v1/predict" in client("GET", "/openapi.json").json()["paths"]


def test_service_answers_equal_restuning_predict(service, runs):
    _, client = service
    answer = client("POST", "/v1/predict", {"tasks": ["b0", "b1", "rt"], "inputs": TEXTS[:4]})
    assert answer.status_code == 200, answer.text
    got = answer.json()["tasks"]
    labels = predict([runs["b0"], runs["b1"], runs["rt"]], texts=TEXTS[:4])
    for (run, logits), name in zip(predict_logits([runs["b0"], runs["b1"], runs["rt"]], texts=TEXTS[:4]),
                                   ("b0", "b1", "rt")):
        probabilities = torch.tensor([list(p["probabilities"].values()) for p in got[name]])
        torch.testing.assert_close(probabilities, logits.softmax(-1), atol=1e-5, rtol=0)
        assert [p["label"] for p in got[name]] == labels[str(run.path)]


def test_requests_for_different_tasks_within_the_window_share_one_backbone_forward(service):
    _, client = service
    before = _forwards(client)
    bodies = [{"task": f"b{i}", "inputs": TEXTS[2 * i:2 * i + 2]} for i in range(4)]  # 8 inputs: a full batch
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: client("POST", "/v1/predict", b), bodies))
    assert [a.status_code for a in answers] == [200] * 4
    assert _forwards(client) - before == 1
    assert all(len(a.json()["tasks"][b["task"]]) == 2 for a, b in zip(answers, bodies))


def test_images_are_answered_from_base64(service, runs):
    _, client = service
    from restuning.data.sources import decode_image
    from restuning.data.transforms import resize

    answer = client("POST", "/v1/predict", {"task": "img", "inputs": [_png(16), _png(20)]})
    assert answer.status_code == 200, answer.text
    probabilities = torch.tensor([list(p["probabilities"].values()) for p in answer.json()["tasks"]["img"]])
    images = torch.cat([resize(decode_image(base64.b64decode(_png(s)))[None], 16) for s in (16, 20)])
    ((_, logits),) = list(predict_logits([runs["img"]], images=images))
    torch.testing.assert_close(probabilities, logits.softmax(-1), atol=1e-5, rtol=0)


def test_tasks_are_added_and_removed_at_run_time(service, runs):
    _, client = service
    added = client("POST", "/v1/tasks", {"name": "later", "run": "later"})
    assert added.status_code == 201, added.text
    answer = client("POST", "/v1/predict", {"task": "later", "inputs": TEXTS[:2]})
    ((_, logits),) = list(predict_logits([runs["later"]], texts=TEXTS[:2]))
    got = torch.tensor([list(p["probabilities"].values()) for p in answer.json()["tasks"]["later"]])
    torch.testing.assert_close(got, logits.softmax(-1), atol=1e-5, rtol=0)
    assert client("POST", "/v1/tasks", {"name": "later", "run": "later"}).status_code == 409
    assert client("DELETE", "/v1/tasks/later").status_code == 200
    gone = client("POST", "/v1/predict", {"task": "later", "inputs": TEXTS[:1]})
    assert gone.status_code == 404 and "b0" in gone.json()["error"]
    assert client("DELETE", "/v1/tasks/later").status_code == 404
    again = client("POST", "/v1/tasks", {"name": "later", "run": "b1"})  # the name again, on another run
    assert again.status_code == 201, again.text
    answer = client("POST", "/v1/predict", {"task": "later", "inputs": TEXTS})
    torch.testing.assert_close(_probabilities(answer, "later"), _expected(runs["b1"]), atol=1e-5, rtol=0)
    assert client("DELETE", "/v1/tasks/later").status_code == 200


@pytest.mark.parametrize("body,status,message", [
    ({"name": "x", "run": "../elsewhere"}, 403, "outside the task root"),
    ({"name": "x", "run": "escape"}, 403, "outside the task root"),  # a symbolic link that leads out
    ({"name": "x", "run": "b\x000"}, 400, "not a usable path"),
    ({"name": "x.y", "run": "b0"}, 400, "without '.'"),
    ({"name": "x", "run": "damaged"}, 422, "does not load|not a"),
    ({"name": "x", "run": "img-missing"}, 422, "not a finished run"),
    ({"name": "x"}, 400, "expected"),
])
def test_a_task_that_cannot_be_added_is_refused_and_the_rest_keep_serving(service, body, status, message):
    _, client = service
    refused = client("POST", "/v1/tasks", body)
    assert refused.status_code == status and re.search(message, refused.json()["error"]), refused.text
    assert "Traceback" not in refused.text and "\\u001b" not in refused.text  # a message, not a remote traceback
    assert client("POST", "/v1/predict", {"task": "b0", "inputs": TEXTS[:1]}).status_code == 200


def test_auth_and_limits(service):
    _, client = service
    assert client("GET", "/v1/tasks", key="wrong").status_code == 401
    anonymous = Client(client.url, key=None)
    assert anonymous("GET", "/v1/tasks").status_code == 401
    assert anonymous.session.get(client.url + "/v1/tasks", headers={"X-API-Key": KEY}).status_code == 200
    assert anonymous.session.get(client.url + "/v1/tasks", headers={"authorization": f"bearer {KEY}"}
                                 ).status_code == 200

    def chunks():  # a chunked body, with no Content-Length to refuse it by
        yield b'{"task": "b0", "inputs": ["'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"]}'

    chunked = client.session.post(client.url + "/v1/predict", data=chunks(), timeout=60,
                                  headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["error"]
    assert Client(client.url, key=None)("GET", "/health").status_code == 200
    big = client("POST", "/v1/predict", raw=json.dumps({"task": "b0", "inputs": ["x" * 70_000]}).encode())
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]
    assert client("POST", "/v1/predict", raw=b"{not json").status_code == 400


def test_a_load_with_bad_requests_mixed_in_loses_no_good_request(service, runs):
    _, client = service
    bad = [{"task": "nope", "inputs": ["a"]}, {"task": "img", "inputs": ["plain text"]},
           {"task": "b0", "inputs": []}, {"task": "b1", "inputs": ["a"] * 9}]
    bodies = []
    for i in range(24):
        bodies.append(bad[i % 4] if i % 3 == 0 else {"task": f"b{i % 4}", "inputs": [TEXTS[i % 8]]})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client("POST", "/v1/predict", b), bodies))
    expected = {f"b{i}": predict([runs[f"b{i}"]], texts=TEXTS)[str(runs[f"b{i}"])] for i in range(4)}
    for body, answer in zip(bodies, answers):
        if body in bad:
            assert 400 <= answer.status_code < 500, answer.text
        else:
            assert answer.status_code == 200, answer.text
            assert answer.json()["tasks"][body["task"]][0]["label"] == expected[body["task"]][TEXTS.index(
                body["inputs"][0])]
    metrics = client("GET", "/metrics").text
    assert re.search(r'restuning_requests_total\{route="/v1/predict",status="404"\} [1-9]', metrics)
    assert "restuning_batch_inputs_bucket" in metrics and "restuning_request_seconds_bucket" in metrics


def test_two_replicas_serve_the_same_tasks(service, runs):
    from ray import serve

    from restuning.serve.service import build, plan

    config = ServeConfig(runs=[str(runs["b0"]), str(runs["b1"])], task_root=str(runs["b0"].parent), replicas=2,
                         max_batch_size=8, max_inputs=8, max_wait_ms=20)
    groups, _ = plan(config)
    serve.run(build(config, groups), name="replicated", route_prefix="/r2")
    try:
        client = Client(service[0]["url"] + "/r2", key=None)
        assert client("POST", "/v1/tasks", {"name": "b2", "run": "b2"}).status_code == 201
        bodies = [{"task": f"b{i % 3}", "inputs": [TEXTS[i % 8]]} for i in range(32)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: client("POST", "/v1/predict", b), bodies))
        assert [a.status_code for a in answers] == [200] * 32
        # b2 was added through one replica; the other loaded it before its next batch, so both answer it
        assert len({a.headers["x-restuning-replica"] for a, b in zip(answers, bodies) if b["task"] == "b2"}) == 2
        expected = {f"b{i}": predict([runs[f"b{i}"]], texts=TEXTS)[str(runs[f"b{i}"])] for i in range(3)}
        for body, answer in zip(bodies, answers):
            assert answer.json()["tasks"][body["task"]][0]["label"] == expected[body["task"]][TEXTS.index(
                body["inputs"][0])]
        # removed and added again on another run: every replica drops the old one and serves the new
        assert client("DELETE", "/v1/tasks/b2").status_code == 200
        assert client("POST", "/v1/tasks", {"name": "b2", "run": "b3"}).status_code == 201
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: client("POST", "/v1/predict", {"task": "b2", "inputs": TEXTS}),
                                    range(16)))
        for answer in answers:
            torch.testing.assert_close(_probabilities(answer, "b2"), _expected(runs["b3"]), atol=1e-5, rtol=0)
        assert len({a.headers["x-restuning-replica"] for a in answers}) == 2
    finally:
        serve.delete("replicated")
