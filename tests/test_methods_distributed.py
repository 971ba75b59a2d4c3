"""The method modules under DistributedDataParallel as the runner wraps learners: 2 CPU (gloo) processes, each its own
batch and Gumbel sample; after SGD steps the replicas are equal and differ from the start (MaPLe also on a timm
EVA02-style image tower)."""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from anchoropt.runner import distributed as dist_utils
    from anchoropt import testing
    from anchoropt.methods import CoCoOp, DePT, MaPLe

    ctx = dist_utils.init_from_env("cpu")
    model = testing.tiny_open_clip(layers=3, vision_layers=3).requires_grad_(False)
    names = ["dog", "cat", "golden retriever"]
    torch.manual_seed(0)  # the same initial learners on both processes
    anchors = torch.randn(1, 64)
    learners = {
        "cocoop": CoCoOp(model, names, template="anchoropt", n_ctx=2, anchors=anchors),
        "dept": DePT(model, names, n_ctx=2, base="cocoop"),
        "maple": MaPLe(model, names, template="anchoropt", n_ctx=2, prompt_depth=3, anchors=anchors),
        # EVA02-style timm image tower (rope rows, stripped prompts) under DDP too
        "maple_eva": MaPLe(testing.tiny_timm_clip("eva").requires_grad_(False), names, template="anchoropt",
                           n_ctx=2, prompt_depth=3, anchors=anchors),
    }
    start = {k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in learners.items()}
    torch.manual_seed(100 + rank)  # each process: its own batch and Gumbel noise
    tensors = {}
    for key, learner in learners.items():
        module = dist_utils.wrap_ddp(learner.train(), ctx)
        optim = torch.optim.SGD(learner.optimizer_groups(0.05), lr=0.05)
        for _ in range(2):
            x = torch.randn(2, 3, 32, 32) if learner.takes_images else torch.randn(2, 32)
            loss = module(x).loss(torch.randint(0, 3, (2,)))
            optim.zero_grad()
            loss.backward()
            optim.step()
        for name, p in learner.named_parameters():
            tensors[f"{key}.{name}"] = p.detach().contiguous()
            tensors[f"{key}.{name}.start"] = start[key][name].contiguous()
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    del module, learners, optim  # the DDP reducers (and their gloo work) go before the process group does
    gc.collect()
    dist_utils.cleanup(ctx)


def test_two_process_gloo_steps_keep_replicas_equal(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    from safetensors.torch import load_file

    replicas = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    trained = [k for k in replicas[0] if not k.endswith(".start")]
    assert {k.split(".")[0] for k in trained} == {"cocoop", "dept", "maple", "maple_eva"}
    for key in trained:
        torch.testing.assert_close(replicas[0][key], replicas[1][key], rtol=0, atol=1e-7, msg=key)
    for key in ("cocoop.text.learner.soft", "dept.linear_probe_proj.weight", "maple.proj.weight",
                "maple_eva.proj.weight"):
        assert not torch.equal(replicas[0][key], replicas[0][key + ".start"]), key
