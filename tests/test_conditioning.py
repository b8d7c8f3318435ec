"""The condition table on its own: lookups, chunking, off-schedule timesteps, the MLP mask."""

from __future__ import annotations

import torch

from conftest import tiny_connector
from ella import conditioning
from ella.conditioning import ConditionTable, placeholder_embeds
from ella.text import TextFeatures


def table_for(connector, schedule, mask=None):
    torch.manual_seed(0)
    feats = TextFeatures(torch.randn(3, 6, 16), mask)
    return feats, ConditionTable(connector, feats, timesteps=lambda: schedule)


def test_lookup_by_schedule_position_equals_by_value_and_direct_calls():
    connector = tiny_connector(seed=2)
    schedule = torch.tensor([999, 700, 700, 400, 1])  # a repeated step, as second-order schedulers have
    feats, table = table_for(connector, schedule)
    rows = torch.tensor([2, 0, 2])
    placeholder = placeholder_embeds(rows, "cpu")
    table.precompute()
    by_value = dict(table._index)
    table._index = {}  # now only the storage-offset route can find anything
    assert [table._position(t) for t in schedule] == [by_value[float(t)] for t in schedule]
    assert table._position(torch.tensor(400)) is None  # a copy is not an element of the schedule
    table._index = by_value
    for t in schedule:
        direct = connector(feats.hidden_states[rows], t)
        assert torch.allclose(table.condition_for_placeholder(t, placeholder), direct, atol=1e-5)
        assert torch.allclose(table.condition(float(t), rows), direct, atol=1e-5)
    assert table._stack.shape[0] == 4  # the repeated timestep is computed once
    assert table._position(torch.tensor(400)) == by_value[400.0]  # a copy is found by value


def test_off_schedule_timestep_is_computed_on_demand():
    connector = tiny_connector(seed=3)
    feats, table = table_for(connector, torch.tensor([999, 500]))
    rows = torch.tensor([1])
    out = table.condition(torch.tensor(123.25), rows)
    assert torch.allclose(out, connector(feats.hidden_states[rows], 123.25), atol=1e-5)
    assert 123.25 in table._extra


def test_chunked_table_equals_one_call(monkeypatch):
    connector = tiny_connector(seed=4)
    schedule = torch.arange(999, 0, -100)
    _, whole = table_for(connector, schedule)
    monkeypatch.setattr(conditioning, "MAX_ROWS_PER_CALL", 7)  # 2 timesteps x 3 rows per call
    _, chunked = table_for(connector, schedule)
    whole.precompute()
    chunked.precompute()
    assert torch.allclose(whole._stack, chunked._stack, atol=1e-6)


def test_mlp_connector_passes_the_text_mask_to_the_unet():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])
    _, table = table_for(tiny_connector(seed=5, variant="mlp"), [10], mask)
    assert torch.equal(table.encoder_attention_mask(placeholder_embeds(torch.tensor([2, 0]), "cpu")), mask[[2, 0]])
    _, tsc_table = table_for(tiny_connector(seed=5), [10], mask)
    assert (
        tsc_table.encoder_attention_mask(placeholder_embeds(torch.tensor([2, 0]), "cpu")) is None
    )  # 64 latents: no mask
