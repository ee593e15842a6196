"""rq.memory: a loaded model owns its weights (the checkpoint's memory map is released), values unchanged."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rq.memory import _mapped_ranges, own_parameters, release_freed_memory
from rq.models.adapters import load_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _in_map(model) -> int:
    ranges = _mapped_ranges(".safetensors")
    return sum(any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)
               for t in list(model.parameters()) + list(model.buffers()))


def test_own_parameters_copies_map_views_and_keeps_values(tiny_checkpoints):
    ckpt = tiny_checkpoints("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    viewing = _in_map(model)
    assert viewing > 0, "transformers no longer maps the checkpoint: nothing left to test"
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight

    assert own_parameters(model) == viewing
    gc.collect()
    assert _in_map(model) == 0 and _mapped_ranges(".safetensors") == []
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    release_freed_memory()  # callable any time; frees nothing the model uses
    torch.testing.assert_close(model.lm_head.weight, before["lm_head.weight"], rtol=0, atol=0)


def test_load_model_leaves_no_view_into_the_checkpoint(tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints("qwen3_moe"))
    assert _in_map(model) == 0
