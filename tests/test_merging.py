"""Weight-op tuners fold into the frozen linear layer exactly (LoRA merging, SSF folding)."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, hidden

import restuning
from restuning import ResTuningConfig, TunerSpec


@pytest.mark.parametrize("tuner,method", [("lora", "merged"), ("ssf", "folded")])
@pytest.mark.parametrize("family", ["vit", "bert"])
def test_tuner_folds_into_its_linear_exactly(tuner, method, family):
    case = CASES[family]
    config = ResTuningConfig(mha=None, ffn=None, custom={"qv": TunerSpec(tuner, dim=4)},
                             target_modules={"qv": r".*\.(q_proj|v_proj|query|value)"})
    tuned = restuning.get_restuning_model(case.model(), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.tuners.parameters():
            p.normal_(0, 0.1)  # trained-looking weights; zero-initialised parts included
    expected = hidden(tuned(**case.inputs())).detach()
    folded = {site.exit: getattr(tuned.tuners[key], method)(tuned.base_model.get_submodule(site.exit))
              for key, site in tuned.sites.items()}
    base = tuned.unload()
    assert (hidden(base(**case.inputs())) - expected).abs().max() > 1e-3  # the tuners did change the output
    for name, linear in folded.items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, linear)
    torch.testing.assert_close(hidden(base(**case.inputs())), expected, atol=1e-6, rtol=0)
