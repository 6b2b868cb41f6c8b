"""Where does the GPU time go? ResNet-50 bottleneck-inner-50, batch 64: dense / exact / drop, NCHW vs
channels_last, TF32 on (PyTorch's default for cuDNN convs), plus the top CUDA kernels of exact vs drop.

    python benchmarks/profile_cuda.py [--batch 64] [--scenario bottleneck-inner-50]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compactor import bench, timing  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scenario", default="bottleneck-inner-50")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_cuda.py: no CUDA device here; nothing to do")
        return
    prep = bench.prepare("resnet50", args.scenario, variants=("dense", "masked", "compact", "compact-drop"))
    models = {k: prep.variants[k] for k in ("dense", "compact", "compact-drop")}
    x = torch.randn(args.batch, *prep.input_shape, device="cuda")
    for fmt in (torch.contiguous_format, torch.channels_last):
        ms = {k: m.to("cuda", memory_format=fmt).eval() for k, m in models.items()}
        xx = x.to(memory_format=fmt)
        with torch.inference_mode():
            t = timing.measure({k: (lambda m=m: m(xx)) for k, m in ms.items()}, repeats=15, cuda=True)
        d = t["dense"].median
        print(f"{'channels_last' if fmt is torch.channels_last else 'NCHW':13s} "
              + "  ".join(f"{k} {v.median * 1e3:.2f} ms (x{d / v.median:.2f})" for k, v in t.items()))
    for k in ("compact", "compact-drop"):
        m = models[k].to("cuda", memory_format=torch.contiguous_format)
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                m(x)
            torch.cuda.synchronize()
        print(f"--- {k}: top CUDA kernels over 5 forwards")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
