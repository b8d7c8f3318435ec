"""How much of the held-out position language MiniLM itself makes readable: a probe, no diffusion involved.

    python benchmarks/shapes_probe_positions.py          # ~20 s on 2 CPU cores

The shapes connector can only carry over to a phrase it never saw ("high on the left") what the LLM's
features of that phrase share with the training phrases ("in the top left corner"). This measures that
directly: every position phrase of the world (``ella.shapes.language``) in five caption frames, MiniLM's
features averaged over the phrase's tokens, a classifier fitted on the training phrases only, then asked
for the cell of each held-out phrase. Linear probes (row and column apart) and a small MLP over the nine
cells, with Gaussian input noise of several sizes (the noise the connector ablation tried). Its accuracy on
held-out phrases is a rough bound on what a connector trained on the same training language can read.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from ella.shapes.language import HELDOUT, TRAIN, Lexicon
from ella.shapes.models import minilm_path

FRAMES = (
    "a red circle {}.",
    "There is a large blue square {}.",
    "Draw a small yellow cross {}, on a white background.",
    "A black diamond is {}.",
    "{}: green triangle",  # the bare form, as in terse tags
)


@torch.no_grad()
def phrase_features(lexicon: Lexicon, llm, tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """MiniLM's last layer averaged over each phrase's tokens, in every frame; the cell (0-8) of each."""
    feats, cells, phrases = [], [], []
    for (row, col), place in lexicon.all_places():
        for frame in FRAMES:
            phrase = place.bare if frame.startswith("{}:") else place.prep
            text = frame.format(phrase)
            enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
            offsets = enc.pop("offset_mapping")[0].tolist()
            hidden = llm(**enc).last_hidden_state[0]
            start = text.index(phrase)
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= start + len(phrase)]
            feats.append(hidden[inside].mean(0))
            cells.append(row * 3 + col)
            phrases.append(phrase)
    return torch.stack(feats), torch.tensor(cells), phrases


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, steps: int, lr: float, wd: float):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    scale = noise * x.pow(2).mean().sqrt()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x + scale * torch.randn_like(x)), y).backward()
        opt.step()
    return model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    llm = AutoModel.from_pretrained(str(minilm_path())).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    xt, yt, _ = phrase_features(TRAIN, llm, tokenizer)
    xh, yh, held = phrase_features(HELDOUT, llm, tokenizer)
    print(f"{len(xt)} training and {len(xh)} held-out phrase mentions")
    mu, sd = xt.mean(0), xt.std(0) + 1e-5
    for axis, name in ((0, "row"), (1, "column")):
        pick = (lambda c: c // 3) if axis == 0 else (lambda c: c % 3)
        torch.manual_seed(0)
        probe = fit(torch.nn.Linear(384, 3), (xt - mu) / sd, pick(yt), 0.0, 500, 1e-2, 1e-2)
        print(
            f"linear probe, {name}: training phrases {accuracy(probe, (xt - mu) / sd, pick(yt)):.1f}%, "
            f"held-out phrases {accuracy(probe, (xh - mu) / sd, pick(yh)):.1f}%"
        )
    for noise in (0.0, 0.25, 0.5, 1.0):
        held_acc, train_acc = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            mlp = torch.nn.Sequential(torch.nn.Linear(384, 512), torch.nn.GELU(), torch.nn.Linear(512, 9))
            fit(mlp, xt, yt, noise, 1500, 1e-3, 0.0)
            held_acc.append(accuracy(mlp, xh, yh))
            train_acc.append(accuracy(mlp, xt, yt))
        print(
            f"MLP probe, 9 cells, input noise {noise} x RMS: training phrases {sum(train_acc) / len(train_acc):.1f}%, "
            f"held-out phrases {sum(held_acc) / len(held_acc):.1f}% (mean of {args.seeds} seeds)"
        )
    torch.manual_seed(0)
    mlp = fit(
        torch.nn.Sequential(torch.nn.Linear(384, 512), torch.nn.GELU(), torch.nn.Linear(512, 9)),
        xt,
        yt,
        0.0,
        1500,
        1e-3,
        0.0,
    )
    with torch.no_grad():
        wrong = (mlp(xh).argmax(1) != yh).tolist()
    misses: dict[str, int] = {}
    for phrase, w in zip(held, wrong):
        misses[phrase] = misses.get(phrase, 0) + w
    worst = sorted(misses.items(), key=lambda kv: -kv[1])[:8]
    print("most missed held-out phrases (of 5 frames each):", ", ".join(f"{p!r} {n}" for p, n in worst))


if __name__ == "__main__":
    main()
