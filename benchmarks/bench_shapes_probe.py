#!/usr/bin/env python
"""Throughput probe for the shapes recipe's GPU stages (random data; only shapes matter).

Run: PYTHONPATH=src OUT=out python benchmarks/bench_shapes_probe.py  (CUDA only; writes $OUT/probe.json)
"""

import json
import os
import time

import torch
import torch.nn.functional as F

from ella.shapes import models as M

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True
res = {}


def bench(name, step, n=30, warm=5):
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


sched = M.new_scheduler()
for compiled in (False, True):
    for B in (512, 1024):
        unet = M.new_unet().to(dev).train()
        fwd = torch.compile(unet, dynamic=False) if compiled else unet  # dynamic shapes crashed inductor at b1024
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
        x0 = torch.randn(B, 4, 16, 16, device=dev)
        cond = torch.randn(B, 20, 384, device=dev)

        def step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (B,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = fwd(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
            opt.zero_grad()
            loss.backward()
            opt.step()

        s = bench("unet", step, warm=8 if compiled else 5)
        res[f"base_unet_b{B}{'_compiled' if compiled else ''}"] = round(B / s)
        print(res, flush=True)
vae = M.new_vae().to(dev).train()
opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, fused=True)
x = torch.rand(256, 3, 64, 64, device=dev) * 2 - 1


def vstep():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
    loss = F.mse_loss(rec.float(), x)
    opt.zero_grad()
    loss.backward()
    opt.step()


res["vae_b256"] = round(256 / bench("vae", vstep, n=20))
print(res, flush=True)
conn = M.new_connector().to(dev).train()
unet = M.new_unet().to(dev, torch.bfloat16).requires_grad_(False)
opt = torch.optim.AdamW(conn.parameters(), lr=1e-4, fused=True)
B = 256
feats = torch.randn(B, 128, 384, device=dev)
x0 = torch.randn(B, 4, 16, 16, device=dev)


def cstep():
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (B,), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c = conn(feats, t)
        pred = unet(sched.add_noise(x0, noise, t).bfloat16(), t, encoder_hidden_states=c.bfloat16()).sample
    loss = F.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
    opt.zero_grad()
    loss.backward()
    opt.step()


res["connector_step_b256_no_llm"] = round(B / bench("conn", cstep))
print(res, flush=True)
with open(os.path.join(os.environ["OUT"], "probe.json"), "w") as f:
    json.dump(res, f)
