"""Multi-process training: a 2-process CPU (gloo) run of the runner keeps its DDP replicas equal."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from anchoropt.datasets import folders as D
from anchoropt.runner import distributed as dist_utils


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, folder: str, descriptions: str, out: str) -> None:
    """One process of the run, as torchrun would start it (environment variables), then dump its replica."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from anchoropt import runner

    cfg = runner.RunConfig(data=folder, model="tiny-test", pretrained=None, descriptions=descriptions,
                           output=os.path.join(out, "run"), shots=4, epochs=2, warmup_epochs=0, batch_size=2,
                           stage1_steps=2, device="cpu", progress=False, plots=False)
    result = runner.run_training(cfg)
    learner = result.learner
    save_file({k: v.contiguous() for k, v in learner.state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"results": result.results["results"], "stage2": result.results["stage2"],
                   "world_size": result.results["world_size"]}, f)


def test_two_process_gloo_run_keeps_replicas_equal(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    folder = D.make_synthetic_image_folder(tmp_path / "shapes", per_class=12, size=32)
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps({n: [f"a {n}."] for n in ("circle", "square", "stripe", "cross")}))
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(folder), str(descriptions), str(tmp_path)),
                                nprocs=2, join=True)
    from safetensors.torch import load_file

    replicas = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert set(replicas[0]) == {"soft", "anchors", "position.logits"}
    for key in replicas[0]:
        torch.testing.assert_close(replicas[0][key], replicas[1][key], rtol=0, atol=0, msg=key)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["world_size"] == 2
    # 8 training images (2 base classes x 4 shots), batch 2 per process: 2 steps per epoch on each of the 2
    assert reports[0]["stage2"]["steps_per_epoch"] == 2
    # each process saw its own batches (different losses), yet the parameters stayed in sync
    assert reports[0]["stage2"]["epoch_losses"] != reports[1]["stage2"]["epoch_losses"]
    # evaluation: disjoint slices, counts summed, the same numbers on both processes, every test image once
    assert reports[0]["results"] == reports[1]["results"]
    assert reports[0]["results"]["base"]["n_images"] == 8
    # rank 0 wrote the run; what it saved is the replica
    saved = load_file(str(tmp_path / "run" / "prompt_learner" / "anchoropt.safetensors"))
    torch.testing.assert_close(saved["soft"], replicas[0]["soft"])


def test_single_process_helpers_are_no_ops():
    ctx = dist_utils.init_from_env("cpu")
    assert not ctx.distributed and ctx.is_main and ctx.device.type == "cpu"
    module = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_ddp(module, ctx) is module and dist_utils.unwrap(module) is module
    assert dist_utils.shard([1, 2, 3], ctx) == [1, 2, 3]
    assert dist_utils.all_reduce_sum([1.0, 2.0], ctx) == [1.0, 2.0]
    two = dist_utils.DistContext(rank=1, world_size=2)
    assert dist_utils.shard(list(range(5)), two) == [1, 3]
