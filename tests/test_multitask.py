"""MultiTaskBypass: N tasks, one backbone forward, the same answers as each task alone."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_CASES

import restuning
from restuning import BypassConfig, MultiTaskBypass, ResTuningBypassModel, TunerSpec

TASK_CONFIGS = {
    "sentiment": BypassConfig(num_classes=3),
    "topic": BypassConfig(horizontal=TunerSpec("lora", dim=4), vertical="res_prefix", num_classes=5),
    "shallow": BypassConfig(layers=[0], num_classes=2),
}


def _single_models(name: str) -> dict[str, ResTuningBypassModel]:
    """Each task trained alone on its own copy of the backbone."""
    case, models = ALL_CASES[name], {}
    for i, (task, config) in enumerate(TASK_CONFIGS.items()):
        torch.manual_seed(i)
        model = restuning.get_restuning_model(case.model(), config)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        for _ in range(2):
            out = model(**case.inputs())
            loss = torch.nn.functional.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[task] = model.eval()
    return models


@pytest.mark.parametrize("name", ["bert", "vit", "convnext"])
def test_every_task_for_every_sample_equals_each_model_alone(name, tmp_path):
    case = ALL_CASES[name]
    singles = _single_models(name)
    for task, model in singles.items():
        model.save_pretrained(tmp_path / task)
    multi = MultiTaskBypass(case.model(), {task: tmp_path / task for task in singles}).eval()
    forwards, whole = [], []
    multi.base_model.register_forward_pre_hook(lambda *a: forwards.append(1))
    multi.base_model.get_submodule(multi.taps.points[-1]).register_forward_pre_hook(lambda *a: whole.append(1))
    answers = multi(**case.inputs())
    assert len(whole) == 1, "the backbone must run once per batch for all tasks"
    assert len(forwards) == 2  # and, once per input shape, one example up to its first tap (`backbone_tokens`)
    assert list(answers) == list(TASK_CONFIGS)
    for task, model in singles.items():
        torch.testing.assert_close(answers[task], model(**case.inputs()), atol=1e-5, rtol=0)


def test_each_sample_gets_its_own_task():
    case = ALL_CASES["bert"]
    singles = _single_models("bert")
    multi = MultiTaskBypass(case.model(), singles).eval()
    alone = {task: model(**case.inputs()) for task, model in singles.items()}
    for ids in (["topic", "sentiment"], [2, 0], torch.tensor([1, 1])):
        answers = multi(**case.inputs(), task_ids=ids)
        names = [list(singles)[int(t)] if not isinstance(t, str) else t for t in list(ids)]
        assert len(answers) == 2
        for row, task in enumerate(names):
            torch.testing.assert_close(answers[row], alone[task][row], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        multi(**case.inputs(), task_ids=["nope", "topic"])
    with pytest.raises(ValueError, match="one task per sample"):
        multi(**case.inputs(), task_ids=["topic"])


def test_adding_or_removing_a_task_never_touches_the_backbone(tmp_path):
    case = ALL_CASES["vit"]
    singles = _single_models("vit")
    multi = MultiTaskBypass(case.model(), {"sentiment": singles["sentiment"]}).eval()
    weights = {k: v.clone() for k, v in multi.base_model.state_dict().items()}
    first = multi(**case.inputs())["sentiment"].detach()
    multi.add_task("shallow", singles["shallow"])
    multi.add_task("topic", TASK_CONFIGS["topic"])  # a fresh, untrained task
    multi.remove_task("shallow")
    assert list(multi.tasks) == ["sentiment", "topic"]
    assert all(torch.equal(v, weights[k]) for k, v in multi.base_model.state_dict().items())
    assert all(not p.requires_grad for p in multi.base_model.parameters())
    torch.testing.assert_close(multi(**case.inputs())["sentiment"], first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        multi.add_task("topic", TASK_CONFIGS["topic"])


def test_a_task_saved_from_the_multi_task_model_loads_on_its_own(tmp_path):
    case = ALL_CASES["bert"]
    singles = _single_models("bert")
    multi = MultiTaskBypass(case.model(), singles).eval()
    multi.save_task("topic", tmp_path)
    alone = ResTuningBypassModel.from_pretrained(case.model(), tmp_path)
    torch.testing.assert_close(alone(**case.inputs()), multi(**case.inputs())["topic"], atol=0, rtol=0)


def test_a_task_for_another_backbone_is_refused(tmp_path):
    other = restuning.get_restuning_model(ALL_CASES["vit"].model(depth=3), BypassConfig(num_classes=2))
    other.save_pretrained(tmp_path)
    multi = MultiTaskBypass(ALL_CASES["vit"].model())
    with pytest.raises(restuning.CheckpointError):
        multi.add_task("other", tmp_path)
    assert not multi.tasks
