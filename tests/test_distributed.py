"""The distributed contract, with two CPU processes over gloo.

Every rank computes features for its rows of a global batch with a DDP-wrapped model,
calls the loss on its local rows and ``backward()``; DDP averages the gradients.  The
parameters must then hold exactly the gradient of the single-process loss over the
concatenated batch, and every rank must report the global loss — for CLIP and SigLIP,
plain and tiled, with labels and label smoothing, and with ranks of unequal sizes.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clipforge import clip_loss, siglip_loss

D_IN, D = 6, 5
CASES = [
    # name, loss, chunk_size, use labels, label smoothing
    ("clip-naive", "clip", None, False, 0.0),
    ("clip-tiled", "clip", 3, False, 0.0),
    ("clip-tiled-labels-smooth", "clip", 2, True, 0.1),
    ("clip-naive-labels-smooth", "clip", None, True, 0.1),
    ("siglip-naive", "siglip", None, False, 0.0),
    ("siglip-tiled", "siglip", 3, False, 0.0),
    ("siglip-tiled-labels", "siglip", 4, True, 0.0),
]


class Towers(nn.Module):
    """Two small towers and a learnable temperature and bias: enough to check every gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D))
        self.text = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D))
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-1.5))

    def forward(self, x_img, x_txt):
        img = nn.functional.normalize(self.image(x_img), dim=-1)
        txt = nn.functional.normalize(self.text(x_txt), dim=-1)
        return img, txt, self.log_scale.exp(), self.bias


def global_batch(n):
    g = torch.Generator().manual_seed(123)
    x_img = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    x_txt = x_img + 0.5 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    labels = torch.arange(n) // 2  # pairs of rows share a group, across rank borders too
    return x_img, x_txt, labels


def compute_loss(model, x_img, x_txt, labels, case, distributed):
    _, kind, chunk, use_labels, eps = case
    img, txt, s, b = model(x_img, x_txt)
    lab = labels if use_labels else None
    if kind == "clip":
        loss = clip_loss(img, txt, s, labels=lab, label_smoothing=eps, chunk_size=chunk, distributed=distributed)
        return loss + 0 * b  # CLIP has no bias; keep the parameter in the graph for DDP
    return siglip_loss(img, txt, s, b, labels=lab, chunk_size=chunk, distributed=distributed)


def grads_of(model):
    return {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}


def reference(sizes):
    """Single process, whole batch: loss and gradients per case."""
    torch.manual_seed(0)
    model = Towers().double()
    x_img, x_txt, labels = global_batch(sum(sizes))
    out = {}
    for case in CASES:
        model.zero_grad()
        loss = compute_loss(model, x_img, x_txt, labels, case, distributed=False)
        loss.backward()
        out[case[0]] = (loss.detach(), grads_of(model))
    return out


def worker(rank, world, port, sizes, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Towers().double())
        x_img, x_txt, labels = global_batch(sum(sizes))
        lo = sum(sizes[:rank])
        rows = slice(lo, lo + sizes[rank])
        out = {}
        for case in CASES:
            model.zero_grad()
            loss = compute_loss(model, x_img[rows], x_txt[rows], labels[rows], case, distributed=True)
            loss.backward()  # DDP averages gradients over ranks here
            out[case[0]] = (loss.detach(), grads_of(model.module))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[(4, 4), (5, 3)], ids=["equal", "unequal"])
def run(request):
    sizes = list(request.param)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(2, free_port(), sizes, results), nprocs=2, join=True)
    return reference(sizes), dict(results)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_ranks_get_the_single_process_gradient(run, case):
    ref, results = run
    ref_loss, ref_grads = ref[case]
    for rank in (0, 1):
        loss, grads = results[rank][case]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)  # the global loss on every rank
        assert set(grads) == set(ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=f"{case} rank {rank} {name}")


# --------------------------------------------------------------------------------------
# The trainer's step under data parallelism: group labels, SigLIP's bias, accumulation
# --------------------------------------------------------------------------------------

STEP_CASES = [
    # name, loss, chunk_size, micro-batch sizes of rank 0 and rank 1
    ("clip-plain", "clip", None, ([4], [3])),
    ("clip-tiled-accum", "clip", 2, ([2, 2], [2, 1])),
    ("siglip-plain-accum", "siglip", None, ([1, 3], [2, 1])),
    ("siglip-tiled", "siglip", "auto", ([4], [3])),
]
GROUPS = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # image 0 on both ranks, image 1 too


def micro_clip(siglip: bool):
    from clipforge.model import CLIP, CLIPConfig
    from clipforge.model.config import TextConfig, VisionConfig

    config = CLIPConfig(
        embed_dim=8,
        vision=VisionConfig(image_size=8, patch_size=4, width=16, layers=1, heads=2),
        text=TextConfig(context_length=6, vocab_size=32, width=16, heads=2, layers=1),
        init_logit_scale=10.0 if siglip else 1 / 0.07,
        init_logit_bias=-10.0 if siglip else None,
    )
    torch.manual_seed(0)
    return CLIP(config).double()


def step_batch():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(7, 3, 8, 8, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 31, (7, 6), generator=g)
    tokens[:, -1] = 31  # the end token, where the text tower reads out
    return images, tokens


def micro_batches(images, tokens, start, sizes):
    from clipforge.data.batches import MicroBatch

    out = []
    for size in sizes:
        rows = slice(start, start + size)
        out.append(MicroBatch(images[rows], tokens[rows], list(range(start, start + size)), groups=GROUPS[rows]))
        start += size
    return out


def step_worker(rank, world, port, results):
    from clipforge.train.step import compute_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, tokens = step_batch()
        out = {}
        for name, loss, chunk, sizes in STEP_CASES:
            model = micro_clip(loss == "siglip")
            ddp = nn.parallel.DistributedDataParallel(model)
            start = sum(sizes[0]) if rank else 0
            stats = compute_gradients(model, micro_batches(images, tokens, start, sizes[rank]), ddp=ddp, loss=loss,
                                      chunk_size=chunk)
            out[name] = (stats, grads_of(model))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_the_training_step_on_two_ranks_is_the_step_on_one():
    """Each rank holds its share of a batch whose repeated images straddle the ranks: the loss
    gathers the group labels with the features, SigLIP's bias (read from the model, outside the
    DDP wrapper's forward) gets its gradient, and accumulation all-reduces once — every rank
    reports the single-process loss and holds its gradient."""
    from clipforge.train.step import compute_gradients

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(step_worker, args=(2, free_port(), results), nprocs=2, join=True)
    images, tokens = step_batch()
    for name, loss, chunk, _ in STEP_CASES:
        model = micro_clip(loss == "siglip")
        ref = compute_gradients(model, micro_batches(images, tokens, 0, [7]), loss=loss, chunk_size=chunk)
        ref_grads = grads_of(model)
        assert (loss == "siglip") == ("logit_scale.bias" in ref_grads)
        for rank in (0, 1):
            stats, got = results[rank][name]
            assert stats == pytest.approx(ref, rel=1e-12), (name, rank)
            for key, g in ref_grads.items():
                torch.testing.assert_close(got[key], g, rtol=1e-9, atol=1e-12, msg=f"{name} rank {rank} {key}")


# --------------------------------------------------------------------------------------
# The trainer's agreements: a stop flag and the run's counts
# --------------------------------------------------------------------------------------


def reduce_worker(rank, world, port, results):
    from clipforge import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cpu = torch.device("cpu")
        # a stop asked of rank 1 only (15: SIGTERM), then of none
        results[rank] = (distributed.max_over_ranks(15 if rank == 1 else 0, cpu), distributed.max_over_ranks(0, cpu),
                         distributed.sum_over_ranks([10 + rank, 3 * rank], cpu))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_stop_and_sum_their_counts():
    from clipforge import distributed

    cpu = torch.device("cpu")
    assert distributed.max_over_ranks(2, cpu) == 2 and distributed.sum_over_ranks([4, 5], cpu) == [4, 5]  # one process
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(reduce_worker, args=(2, free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1] == (15, 0, [21, 3])
