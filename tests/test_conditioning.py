"""The condition table on its own: lookups by address and by value, chunking, off-schedule timesteps, the MLP mask."""

from __future__ import annotations

import torch

from conftest import tiny_connector
from ella import conditioning
from ella.conditioning import ConditionTable, placeholder_embeds, placeholder_rows
from ella.text import TextFeatures


def table_for(connector, schedule, mask=None, pooled=False):
    torch.manual_seed(0)
    feats = TextFeatures(torch.randn(3, 6, 16), mask)
    return feats, ConditionTable(connector, feats, timesteps=lambda: schedule, pooled=pooled)


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    return calls


def refuse_host_reads(monkeypatch) -> None:
    """From here on, reading a tensor's value on the host (what waits for a GPU) raises."""

    def refuse(*_):
        raise AssertionError("the lookup read a timestep's value on the host")

    for name in ("__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_schedule_elements_are_found_by_address_without_reading_their_value(monkeypatch):
    connector = tiny_connector(seed=2)
    schedule = torch.tensor([999, 700, 700, 400, 1])  # a repeated step, as second-order schedulers have
    feats, table = table_for(connector, schedule)
    calls = count_calls(connector)
    table.precompute()
    assert calls == [4 * 3]  # one batched call; the repeated timestep computed once
    rows = torch.tensor([2, 0, 2])
    refuse_host_reads(monkeypatch)
    found = [table.lookup(t, rows)[0] for t in schedule]  # `for t in timesteps`, as the diffusers loop
    sliced = [table.lookup(t, rows)[0] for t in schedule[2:]]  # img2img's partial schedule is a view
    expanded = table.lookup(schedule[3].expand(3)[0], rows)[0]
    monkeypatch.undo()
    assert len(calls) == 1  # no lookup ran the connector again
    for t, got in zip(schedule, found):
        assert torch.allclose(got, connector(feats.hidden_states[rows], t), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(sliced, found[2:]))
    assert torch.equal(expanded, found[3])


def test_copies_and_numbers_are_found_by_value():
    connector = tiny_connector(seed=2)
    schedule = torch.tensor([999.0, 500.0, 1.0])
    feats, table = table_for(connector, schedule)
    table.precompute()
    calls = count_calls(connector)
    rows = torch.tensor([1])
    for t in (torch.tensor(500.0), 500, 500.0, torch.tensor([500.0]), schedule[1].double()):
        assert table.position(t) == 1
        assert torch.allclose(table.lookup(t, rows)[0], connector(feats.hidden_states[rows], 500.0), atol=1e-5)
    assert calls == [1] * 5  # only the reference calls above


def test_off_schedule_timestep_is_computed_at_each_call_that_asks():
    connector = tiny_connector(seed=3)
    feats, table = table_for(connector, torch.tensor([999, 500]))
    table.precompute()
    calls = count_calls(connector)
    rows = torch.tensor([1, 1])
    out, pooled = table.lookup(torch.tensor(123.25), rows)
    assert pooled is None
    assert torch.allclose(out, connector(feats.hidden_states[rows], 123.25), atol=1e-5)
    assert table.position(123.25) is None
    assert calls == [3, 2]  # all rows at 123.25 for the lookup, then the reference


def test_pooled_embedding_is_the_pooling_head_over_the_same_tokens():
    connector = tiny_connector(seed=6, pooled_dim=5)
    schedule = torch.tensor([900, 300])
    feats, table = table_for(connector, schedule, pooled=True)
    rows = torch.tensor([0, 2])
    for t in (schedule[1], torch.tensor(42.0)):  # on and off the schedule
        tokens, pooled = table.lookup(t, rows)
        assert pooled.shape == (2, 5)
        assert torch.allclose(pooled, connector.pool(connector(feats.hidden_states[rows], t)), atol=1e-5)
        assert torch.allclose(tokens, connector(feats.hidden_states[rows], t), atol=1e-5)


def test_chunked_table_equals_one_call(monkeypatch):
    connector = tiny_connector(seed=4)
    schedule = torch.arange(999, 0, -100)
    _, whole = table_for(connector, schedule)
    calls = count_calls(connector)
    whole.precompute()
    monkeypatch.setattr(conditioning, "MAX_ROWS_PER_CALL", 7)  # 2 timesteps x 3 rows per call
    _, chunked = table_for(connector, schedule)
    rows = torch.tensor([0, 1, 2])
    for t in schedule:
        assert torch.allclose(whole.lookup(t, rows)[0], chunked.lookup(t, rows)[0], atol=1e-6)
    assert calls == [10 * 3] + [2 * 3] * 5


def test_mlp_connector_passes_the_text_mask_to_the_unet():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])
    rows = placeholder_rows(placeholder_embeds(torch.tensor([2, 0]), "cpu"))
    _, table = table_for(tiny_connector(seed=5, variant="mlp"), [10], mask)
    assert torch.equal(table.encoder_attention_mask(rows), mask[[2, 0]])
    _, tsc_table = table_for(tiny_connector(seed=5), [10], mask)
    assert tsc_table.encoder_attention_mask(rows) is None  # 64 latents: no mask
